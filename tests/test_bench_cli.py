"""The benchmark CLI end to end on a tiny shape (correct plumbing, not speed)."""

import csv
import json

import pytest

from subspace_ops.bench.cases import parse_shape
from subspace_ops.cli import main

TINY = ["--shape", "8,16,24", "--repeats", "2", "--warmup", "1", "--device", "cpu"]
VARIANTS = {"subspace_ops", "naive", "naive+compile", "frozen F.linear", "full FT", "peft LoRA r=8"}


def test_bench_writes_json_csv_and_plot(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    assert main(["bench", "rescaled-linear", *TINY, "--json", str(out_json), "--csv", str(out_csv),
                 "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "baseline: frozen F.linear" in printed and "baseline: full FT" in printed
    rows = json.loads(out_json.read_text())["results"]
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in VARIANTS for m in ("forward", "fwd+bwd")}
    for r in rows:
        if r["note"].startswith("skipped"):
            continue
        assert r["median_ms"] > 0 and r["peak_mem_mb"] >= 0 and r["ratio"] > 0, r
        assert r["shape"] == "8x16x24" and r["dtype"] == "float32"
    baseline = {r["mode"]: r for r in rows if r["variant"] == r["baseline"]}
    assert baseline["forward"]["ratio"] == 1.0 and baseline["fwd+bwd"]["variant"] == "full FT"
    ours = next(r for r in rows if r["variant"] == "subspace_ops")
    assert ours["backend"] == "cpu"
    with open(out_csv) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and {"median_ms", "ratio", "peak_mem_mb", "mem_ratio"} <= set(csv_rows[0])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_memory_counts_the_naive_materialized_weight(tmp_path):
    """The naive formula holds W' (N·K floats) on top of what frozen F.linear holds."""
    path = tmp_path / "m.json"
    main(["bench", "--shape", "4,256,512", "--repeats", "1", "--warmup", "1", "--mode", "forward",
          "--device", "cpu", "--json", str(path)])
    rows = {r["variant"]: r for r in json.loads(path.read_text())["results"]}
    weight_mb = 256 * 512 * 4 / 2**20
    assert rows["naive"]["peak_mem_mb"] - rows["frozen F.linear"]["peak_mem_mb"] >= weight_mb * 0.99
    assert rows["subspace_ops"]["peak_mem_mb"] < rows["naive"]["peak_mem_mb"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "no-such-case"], "argument CASE: unknown case"),
        (["bench", "--shape", "1,2"], "argument --shape"),
        (["bench", "--shape", "0,2,3"], "argument --shape"),
        (["bench", "--repeats", "0"], "argument --repeats"),
        (["bench", "--dtype", "int8"], "argument --dtype"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "cpu" in out and "triton" in out


def test_parse_shape_presets():
    assert parse_shape("vit-b") == [(12608, 768, 768)]
    assert parse_shape("3,4,5") == [(3, 4, 5)]
