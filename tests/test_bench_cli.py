"""The benchmark harness and the ``subspace-ops`` CLI, in-process on tiny shapes (plumbing, not speed)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import subspace_ops
from subspace_ops.bench.cases import CASES
from subspace_ops.bench.harness import Case, Variant, VariantSkipped, Workload, read_json, run_case
from subspace_ops.cli import main
from subspace_ops.ops.rescaled_linear import choose_path

from conftest import require_backend

TINY = ["--shape", "8,16,24", "--repeats", "2", "--warmup", "1", "--device", "cpu"]
VARIANTS = {"subspace_ops", "subspace_ops modulated", "naive", "naive+compile", "frozen F.linear", "full FT", "peft LoRA r=8"}
MODES = ("forward", "fwd+bwd")


def test_bench_writes_json_csv_and_plot(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    status = main(["bench", "rescaled-linear", *TINY, "--json", str(out_json), "--csv", str(out_csv),
                   "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "baseline: frozen F.linear" in printed and "baseline: full FT" in printed

    payload = json.loads(out_json.read_text())
    rows = payload["results"]
    assert payload["meta"]["repeats"] == 2 and payload["meta"]["torch"] == torch.__version__
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in VARIANTS for m in MODES}
    for r in rows:
        assert (r["case"], r["shape"], r["M"], r["K"], r["N"]) == ("rescaled-linear", "8x16x24", 8, 16, 24)
        assert r["dtype"] == "float32" and r["device"].startswith("CPU")
        assert r["status"] in ("ok", "skipped"), r  # skipped only for optional variants, with a reason
        if r["status"] == "skipped":
            assert r["variant"] in ("naive+compile", "peft LoRA r=8") and r["note"].startswith("skipped"), r
            continue
        assert r["median_ms"] > 0 and r["q25_ms"] <= r["median_ms"] <= r["q75_ms"], r
        assert r["ratio"] > 0 and r["peak_mem_mb"] > 0 and r["mem_ratio"] > 0, r
    baseline = {r["mode"]: r for r in rows if r["variant"] == r["baseline"]}
    assert baseline["forward"]["variant"] == "frozen F.linear" and baseline["fwd+bwd"]["variant"] == "full FT"
    assert all(b["ratio"] == 1.0 and b["mem_ratio"] == 1.0 for b in baseline.values())
    for r in rows:  # ratio = time / the baseline's time (> 1: slower), and the same for memory
        if r["status"] == "ok":
            base = baseline[r["mode"]]
            assert r["ratio"] == pytest.approx(r["median_ms"] / base["median_ms"]), r
            assert r["mem_ratio"] == pytest.approx(r["peak_mem_mb"] / base["peak_mem_mb"]), r
    backend = subspace_ops.resolve_backend(None, "cpu")
    labels = {r["variant"]: r["backend"] for r in rows}  # the backend and the path that ran
    assert labels["subspace_ops"] == f"{backend} {choose_path(True, 1, torch.float32, tokens=8, backend=backend)}"
    assert labels["subspace_ops modulated"] == f"{backend} modulated"

    with open(out_csv, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    expected_columns = {"case", "variant", "shape", "M", "K", "N", "dtype", "device", "backend", "mode",
                        "median_ms", "ratio", "peak_mem_mb", "mem_ratio", "status", "note"}
    assert expected_columns <= set(csv_rows[0])
    assert {(r["variant"], r["mode"]) for r in csv_rows} == {(r["variant"], r["mode"]) for r in rows}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The JSON reads back into the same rows, and `subspace-ops plot` redraws the charts from it.
    assert [r.to_row() for r in read_json(str(out_json))] == rows
    replot = tmp_path / "again.png"
    assert main(["plot", str(out_json), "--out", str(replot)]) == 0
    assert replot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_counts_the_naive_materialized_weight(tmp_path):
    """Forward with training flags: the naive formula holds W' (N·K floats) more than frozen F.linear."""
    path = tmp_path / "m.json"
    assert main(["bench", "rescaled-linear", "--shape", "4,256,512", "--repeats", "1", "--warmup", "1", "--mode", "forward",
                 "--device", "cpu", "--json", str(path)]) == 0
    rows = {r["variant"]: r for r in json.loads(path.read_text())["results"]}
    weight_mb = 256 * 512 * 4 / 2**20
    assert rows["naive"]["peak_mem_mb"] - rows["frozen F.linear"]["peak_mem_mb"] >= weight_mb * 0.99
    assert rows["subspace_ops"]["peak_mem_mb"] < rows["naive"]["peak_mem_mb"]


def _toy_case() -> Case:
    def ok(scale: float):
        def setup(shape, dtype, device) -> Workload:
            w = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
            return Workload(lambda: w * scale, [w], torch.ones(shape, dtype=dtype, device=device), "toy")

        return setup

    def missing(shape, dtype, device) -> Workload:
        raise VariantSkipped("toy package not installed")

    def broken(shape, dtype, device) -> Workload:
        return Workload(lambda: 1 / 0, [], torch.ones(1))

    variants = [Variant("base", ok(1.0)), Variant("other", ok(2.0)), Variant("missing", missing),
                Variant("optional-broken", broken, optional=True), Variant("required-broken", broken)]
    return Case("toy", "toy case", lambda backend: variants, {"forward": "base", "fwd+bwd": "base"}, ("A", "B"),
                {"small": {"any": [(3, 5)]}}, {"any": ["small"]}, {"cpu": torch.float32})


def test_run_case_reports_skipped_and_failed_variants():
    case = _toy_case()
    results = run_case(case, (3, 5), dtype=torch.float32, device=torch.device("cpu"), warmup=1, repeats=2)
    by = {(r.variant, r.mode): r for r in results}
    assert len(results) == 10
    for mode in MODES:
        assert by["base", mode].ratio == 1.0 and by["other", mode].median_ms > 0
        assert by["base", mode].to_row()["A"] == 3 and by["base", mode].to_row()["B"] == 5
        missing, optional, required = (by[name, mode] for name in ("missing", "optional-broken", "required-broken"))
        assert (missing.status, missing.note) == ("skipped", "skipped: toy package not installed")
        assert optional.status == "skipped" and "ZeroDivisionError" in optional.note
        assert required.status == "failed" and required.median_ms is None and "ZeroDivisionError" in required.note
    assert case.parse_shape("small", "cuda") == [(3, 5)] and case.default_shapes("cpu") == [(3, 5)]


def test_cli_exit_status_is_1_when_a_required_variant_fails(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(CASES, "toy", _toy_case())
    path = tmp_path / "toy.csv"
    assert main(["bench", "toy", "--shape", "3,5", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--csv", str(path)]) == 1
    captured = capsys.readouterr()
    assert "FAILED variants" in captured.err and "required-broken" in captured.err
    assert "toy  A=3 B=5  float32  forward" in captured.out
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} == {"ok", "skipped", "failed"} and rows[0]["A"] == "3"


def test_peft_missing_is_a_printed_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    case = CASES["rescaled-linear"]
    lora = [v for v in case.make_variants(None) if v.name == "peft LoRA r=8"]
    results = run_case(case, (2, 4, 6), dtype=torch.float32, device=torch.device("cpu"), modes=("forward",),
                       warmup=1, repeats=1, variants=lora)
    assert [(r.status, r.note) for r in results] == [("skipped", "skipped: peft not installed (pip install peft)")]


def test_presets_depend_on_the_device():
    case = CASES["rescaled-linear"]
    assert case.parse_shape("vit-b", "cuda") == [(12608, 768, 768)]
    assert case.parse_shape("vit-b", "cpu") == [(4096, 768, 768), (197, 768, 768)]
    assert case.parse_shape("llama-7b", "cpu") == [(8192, 4096, 4096)]
    assert case.parse_shape(" 3, 4,5 ", "cpu") == [(3, 4, 5)]
    assert case.default_shapes("cpu") == [(4096, 768, 768), (197, 768, 768)]
    assert case.default_dtype == {"cuda": torch.bfloat16, "cpu": torch.float32}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "no-such-case"], "argument CASE: unknown case"),
        (["bench", "--shape", "1,2"], "argument --shape: invalid shape '1,2'"),
        (["bench", "--shape", "0,2,3"], "argument --shape"),
        (["bench", "--shape", "a,b,c"], "argument --shape"),
        (["bench", "--shape", "vit-c"], "argument --shape"),
        (["bench", "--repeats", "0"], "argument --repeats: must be >= 1"),
        (["bench", "--warmup", "x"], "argument --warmup"),
        (["bench", "--dtype", "int8"], "argument --dtype"),
        (["bench", "--mode", "backward"], "argument --mode"),
        (["bench", "--json", "/no/such/dir/r.json"], "argument --json"),
        (["bench", "--json", "/"], "argument --json: '/' is a directory"),  # refused before the bench runs
        (["bench", "--csv", "/proc/r.csv"], "argument --csv: cannot write '/proc/r.csv'"),
        (["bench", "rescaled-linear", "--shape", "8,8,8", "--repeats", "1", "--warmup", "0", "--no-compile",
          "--plot", "/tmp/r.txt"],
         "subspace-ops bench: error: argument --plot: '/tmp/r.txt' does not name an image format"),  # before running
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("env, argv, message", [
    ({"SUBSPACE_OPS_BACKEND": "bogus"}, [],
     "error: environment variable SUBSPACE_OPS_BACKEND='bogus' is not a backend: expected one of "
     "reference, cpu, triton"),
    ({"SUBSPACE_OPS_BACKEND": "triton"}, [],
     "error: environment variable SUBSPACE_OPS_BACKEND=triton: backend 'triton' is unavailable for cpu tensors: "),
    ({}, ["--backend", "triton"], "error: argument --backend: backend 'triton' is unavailable for cpu tensors: "),
])
def test_bench_refuses_a_backend_that_cannot_run_up_front(env, argv, message, monkeypatch, capsys):
    """A backend the ops cannot use here -- from --backend or from SUBSPACE_OPS_BACKEND, unknown or
    unavailable (triton on CPU tensors without TRITON_INTERPRET=1) -- is a usage error before anything
    runs, not a table of failed rows."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "rescaled-linear", "--shape", "7,16,16", "--repeats", "1", "--warmup", "0", "--no-compile",
              "--no-memory", "--device", "cpu", *argv])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and message in captured.err, captured.err
    assert captured.out == "" and "Traceback" not in captured.err


def test_bench_backend_argument_is_not_overridden_by_the_env(monkeypatch, capsys, tmp_path):
    """--backend wins over SUBSPACE_OPS_BACKEND as in the ops (which never read the variable then):
    a bogus variable does not stop a run that names its backend."""
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "bogus")
    out = tmp_path / "r.json"
    assert main(["bench", "rescaled-linear", "--shape", "7,16,16", "--repeats", "1", "--warmup", "0", "--no-compile",
                 "--no-memory", "--mode", "forward", "--device", "cpu", "--backend", "reference",
                 "--json", str(out)]) == 0, capsys.readouterr().err
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["subspace_ops"]["status"] == "ok" and rows["subspace_ops"]["backend"] == "reference"


@pytest.mark.parametrize("case_name, shape, expected", [
    ("rescaled-linear", (7, 16, 16), {"subspace_ops": "reference", "subspace_ops modulated": "reference"}),
    ("scaled-linear", (7, 16, 16), {"subspace_ops": "reference", "subspace_ops modulated": "reference"}),
    ("svd-delta-linear", (7, 16, 16), {"subspace_ops": "reference k=16"}),
    ("lowrank-linear", (7, 16, 16), {"subspace_ops": "reference", "subspace_ops DoRA": "reference"}),
    ("head-mixing-attention", (1, 2, 8, 8), {"subspace_ops": "reference"}),
])
@pytest.mark.parametrize("how", ["--backend", "env"])
def test_reference_backend_rows_name_no_path(case_name, shape, expected, how, monkeypatch):
    """The reference backend always materializes the weight: its rows must not carry the fused
    backends' path labels ("modulated", "stacked", "merged", ...) that it does not take, whether it
    comes from --backend or from SUBSPACE_OPS_BACKEND."""
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)
    backend = "reference"
    if how == "env":
        monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "reference")
        backend = None
    ours = {v.name: v for v in CASES[case_name].make_variants(backend) if v.name.startswith("subspace_ops")}
    for mode in ("forward", "inference"):
        labels = {name: v.setup(shape, torch.float32, torch.device("cpu")).label(mode) for name, v in ours.items()}
        assert labels == expected


def test_scaled_linear_rows_name_the_path_of_their_mode():
    """SSB's path depends on whether the call records a gradient (choose_path's needs_grad): the
    inference rows (no_grad) and the training rows each name the path that ran in that mode."""
    from subspace_ops.backends import cpu_extension

    require_backend("cpu")
    own_gemms = cpu_extension().rescaled_linear_gemm_rows() > 0
    ours = next(v for v in CASES["scaled-linear"].make_variants("cpu") if v.name == "subspace_ops")
    workload = ours.setup((197, 16, 16), torch.float32, torch.device("cpu"))
    assert workload.label("inference") == ("cpu modulated" if own_gemms else "cpu separable")
    assert workload.label("forward") == workload.label("fwd+bwd") == "cpu separable"


def test_methods_error_names_every_case_that_takes_methods(monkeypatch, capsys):
    """The cases named as taking --methods are the ones defined with per_method (all four end-to-end
    cases, and any added later), not a list written into the message."""
    import dataclasses

    per_method = {name for name, case in CASES.items() if case.per_method}
    assert per_method >= {"e2e", "e2e-llama", "e2e-unet", "e2e-flux"}
    monkeypatch.setitem(CASES, "toy-e2e", dataclasses.replace(_toy_case(), name="toy-e2e", per_method=True))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "rescaled-linear", "--methods", "ssb", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --methods: applies to the end-to-end cases (" in err
    named = err.split("end-to-end cases (")[1].split(")")[0].split(", ")
    assert set(named) == per_method | {"toy-e2e"}, err
    assert "not ['rescaled-linear']" in err


def test_version(capsys, monkeypatch):
    """``subspace-ops --version`` and ``python -m subspace_ops --version`` print the package version."""
    import runpy

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"subspace-ops {subspace_ops.__version__}\n"
    monkeypatch.setattr(sys, "argv", ["subspace_ops", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("subspace_ops", run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"subspace-ops {subspace_ops.__version__}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cuda_requested_without_cuda(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda", "--shape", "8,16,24"])
    assert "argument --device" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch, capsys, tmp_path):
    import subspace_ops.cli as cli

    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--plot", str(tmp_path / "p.png")])
    assert "argument --plot: needs matplotlib" in capsys.readouterr().err


def test_backends_command(monkeypatch, capsys):
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)  # the table alone: no override lines
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "cpu" in out and "triton" in out
    lines = out.splitlines()
    reason_column = lines[0].index("reason")
    assert all(line[reason_column - 2:reason_column] == "  " and line[reason_column] != " " for line in lines)


@pytest.mark.parametrize("value, expected", [
    ("reference", ["SUBSPACE_OPS_BACKEND=reference overrides the defaults", "  cpu: ops use 'reference'"]),
    ("triton", ["SUBSPACE_OPS_BACKEND=triton overrides the defaults",
                "  cpu: ops raise BackendUnavailableError: backend 'triton' is unavailable for cpu tensors: "]),
    ("bogus", ["environment variable SUBSPACE_OPS_BACKEND='bogus' is not a backend: expected one of "
               "reference, cpu, triton", "every op and layer given no backend raises ValueError"]),
])
def test_backends_command_reports_the_env_override(value, expected, monkeypatch, capsys):
    """With SUBSPACE_OPS_BACKEND set, the report says what the ops then do on each device: use that
    backend, raise because it cannot run there (triton on CPU without the interpreter), or raise
    because the name is no backend; the table's "(default)" alone would be wrong."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton cannot run CPU tensors now
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", value)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    table, _, override = out.partition("\n\n")
    assert table.startswith("device  backend") and "SUBSPACE_OPS_BACKEND" not in table
    for text in expected:
        assert text in override, out
    if value == "reference":  # the same resolution as the ops
        assert subspace_ops.resolve_backend(None, "cpu") == "reference"


def test_backends_command_without_backend_report(monkeypatch, capsys):
    monkeypatch.delattr(subspace_ops.backends, "backend_report")
    assert main(["backends"]) == 0
    assert "reference" in capsys.readouterr().out


def test_list_and_help(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "rescaled-linear" in out and "peft LoRA r=8" in out and "vit-b" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0 and "--shape" in capsys.readouterr().out


def test_python_dash_m_entry_point(monkeypatch, capsys):
    """``python -m subspace_ops`` runs the same CLI (in-process via runpy: a subprocess costs seconds)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["subspace_ops", "bench", "--list"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("subspace_ops", run_name="__main__")
    assert exit_info.value.code == 0
    assert "rescaled-linear" in capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.parametrize("case_name, shape", [("e2e", (2, 32, 1, 64)), ("e2e-llama", (1, 16, 1, 128)),
                                              ("e2e-unet", (1, 16, 32, 8)), ("e2e-flux", (1, 16, 8, 1, 128))])
def test_e2e_cases_run_a_training_step(case_name, shape):
    """The end-to-end cases (not in a bare run): our method, PEFT LoRA and the frozen forward, one
    training step each, with a throughput; compile variants are left out to keep this fast."""
    pytest.importorskip({"e2e": "timm", "e2e-llama": "transformers", "e2e-unet": "diffusers",
                         "e2e-flux": "diffusers"}[case_name])
    pytest.importorskip("peft")
    from subspace_ops.bench.cases import CASES
    from subspace_ops.bench.harness import run_case

    case = CASES[case_name]
    assert not case.in_default_run and case.modes == ("train",)
    variants = [v for v in case.make_variants("cpu") if v.name in ("coeff", "lora", "peft LoRA r=8", "frozen forward")]
    rows = run_case(case, shape, dtype=torch.float32, device=torch.device("cpu"), modes=case.modes, warmup=1,
                    repeats=1, measure_memory=False, variants=variants)
    assert {r.variant for r in rows} == {"coeff", "lora", "peft LoRA r=8", "frozen forward"}
    assert all(r.status == "ok" and r.throughput and r.throughput > 0 for r in rows), [r.note for r in rows]


@pytest.mark.integration
def test_e2e_methods_option_times_any_registry_method(tmp_path, capsys):
    """--methods picks registry methods for the e2e cases: a method with a fused op gets ours, naive and
    naive+compile rows; one without (bitfit) a single row; names are checked before anything runs."""
    pytest.importorskip("timm")
    pytest.importorskip("peft")
    case = CASES["e2e"]
    names = {v.name for v in case.make_variants("cpu", methods=("ssb", "bitfit"))}
    assert names == {"ssb", "ssb+compile", "ssb naive", "ssb naive+compile", "bitfit", "bitfit+compile",
                     "peft LoRA r=8", "full FT", "frozen forward"}
    variants = [v for v in case.make_variants("cpu", methods=("ssb", "dora")) if "compile" not in v.name]
    rows = run_case(case, (2, 32, 1, 64), dtype=torch.float32, device=torch.device("cpu"), modes=case.modes,
                    warmup=1, repeats=1, measure_memory=False,
                    variants=[v for v in variants if v.name.split()[0] in ("ssb", "dora")])
    assert {r.variant for r in rows} == {"ssb", "ssb naive", "dora", "dora naive"}
    assert all(r.status == "ok" and r.throughput > 0 for r in rows), [r.note for r in rows]
    assert {r.backend for r in rows if r.variant.endswith("naive")} == {"reference"}

    out = tmp_path / "e2e.json"
    status = main(["bench", "e2e", "--methods", "bitfit", "--shape", "2,32,1,64", "--repeats", "1", "--warmup", "1",
                   "--device", "cpu", "--no-memory", "--json", str(out)])
    assert status == 0, capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert {r["variant"] for r in rows} == {"bitfit", "bitfit+compile", "peft LoRA r=8", "full FT", "frozen forward"}
    assert json.loads(out.read_text())["meta"]["modes"] == ["train"]  # what the e2e case ran, not --mode's default
    assert "modes train;" in capsys.readouterr().out
    assert next(r["backend"] for r in rows if r["variant"] == "bitfit+compile") == "inductor of torch"
    assert next(r["backend"] for r in rows if r["variant"] == "bitfit") == "torch"  # no op backend to name
    assert all(r["status"] in ("ok", "skipped") for r in rows), rows
    for argv, message in ((["e2e", "--methods", "ssb,nope"], "unknown method(s) ['nope']"),
                          (["rescaled-linear", "--methods", "ssb"], "applies to the end-to-end cases")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", *argv, "--device", "cpu"])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_plot_command_bad_input(tmp_path, capsys):
    """`subspace-ops plot` names the argument that is wrong instead of raising."""
    not_bench = tmp_path / "other.json"
    not_bench.write_text("[1, 2]")
    no_timing = tmp_path / "empty.json"  # a bench file whose variants all skipped or failed
    no_timing.write_text('{"meta": {}, "results": []}')
    csv_file = tmp_path / "results.csv"  # the bench's --csv output passed by mistake
    csv_file.write_text("case,variant\nrescaled-linear,ours\n")
    for argv, message in (
        (["plot", str(csv_file), "--out", str(tmp_path / "p.png")], f"{csv_file}: not a subspace-ops bench JSON"),
        (["plot", str(tmp_path / "missing.json"), "--out", str(tmp_path / "p.png")], "no such file"),
        (["plot", str(no_timing), "--out", str(tmp_path / "p.png")], "nothing to plot"),
        (["plot", str(not_bench), "--out", str(tmp_path / "p.png")], "not a subspace-ops bench JSON file"),
        (["plot", str(not_bench), "--out", str(tmp_path / "no" / "p.png")], "argument --out"),
        (["plot", str(not_bench), "--out", str(tmp_path / "p.txt")], "does not name an image format"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err
        assert "subspace-ops plot: error:" in err  # the plot command's usage, not the top-level one


def test_cpu_timing_runs_every_variant_each_round_in_shuffled_orders():
    """Each round calls every variant once, in an order that changes from round to round (so no
    variant always follows the same one), and the same orders every run."""
    from subspace_ops.bench.harness import _time_cpu_interleaved

    def orders() -> list[tuple[str, ...]]:
        calls: list[str] = []
        steps = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
        timing = _time_cpu_interleaved(steps, repeats=8)
        assert set(timing) == set("abcde")
        return [tuple(calls[i:i + 5]) for i in range(0, len(calls), 5)]

    rounds = orders()
    assert len(rounds) == 8 and all(sorted(r) == list("abcde") for r in rounds)
    assert len(set(rounds)) > 1 and len({r[0] for r in rounds}) > 1
    assert orders() == rounds


def test_flex_attention_on_cpu_times_its_forward_and_names_why_fwd_bwd_is_skipped():
    """FlexAttention has no CPU backward: its forward runs on detached inputs (and matches SDPA), and
    its fwd+bwd row is skipped with that reason rather than an error about requires_grad."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from subspace_ops.bench.attention_case import attention_variants

    shape, cpu = (1, 2, 32, 16), torch.device("cpu")
    variants = {v.name: v for v in attention_variants()}
    workload = variants["flex"].setup(shape, torch.float32, cpu)
    assert workload.grad_output is None and workload.backend == "flex (inductor, no grad)"
    out = workload.forward()
    assert not out.requires_grad
    sdpa = variants["sdpa"].setup(shape, torch.float32, cpu).forward()  # every variant: the same inputs
    torch.testing.assert_close(out, sdpa.detach(), rtol=1e-5, atol=1e-5)
    results = run_case(CASES["head-mixing-attention"], shape, dtype=torch.float32, device=cpu, modes=MODES,
                       repeats=1, warmup=1, variants=[variants["flex"]], measure_memory=False)
    by_mode = {r.mode: r for r in results}
    assert by_mode["forward"].status == "ok" and by_mode["forward"].median_ms > 0, by_mode["forward"]
    assert by_mode["fwd+bwd"].status == "skipped"
    assert by_mode["fwd+bwd"].note == "skipped: ValueError: FlexAttention has no backward on CPU"


def test_no_compile_leaves_out_the_compile_variants(tmp_path, capsys):
    """--no-compile (for a GPU run on a time budget): every variant but the torch.compile ones."""
    out = tmp_path / "r.json"
    status = main(["bench", "rescaled-linear", "--shape", "8,16,24", "--repeats", "1", "--warmup", "1",
                   "--device", "cpu", "--no-memory", "--no-compile", "--json", str(out)])
    assert status == 0, capsys.readouterr().err
    names = {r["variant"] for r in json.loads(out.read_text())["results"]}
    expected = {v.name for v in CASES["rescaled-linear"].make_variants(None)} - {"naive+compile"}
    assert names == expected and "naive" in names


def test_pytest_benchmark_suite_runs_every_variant_once(tmp_path):
    """``pytest benchmarks/`` (the same cases and variants under pytest-benchmark) on tiny shapes of a
    linear and an attention case, each benchmark run once (--benchmark-disable)."""
    pytest.importorskip("pytest_benchmark")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, BENCH_CASES="lowrank-linear,head-mixing-attention", BENCH_SHAPE="16,8,12;1,2,16,8",
               BENCH_DEVICE="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable", "-rs"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 20, summary  # ours, naive, naive+compile, frozen, full FT (+ PEFT) x 2 modes, per case
    assert "failed" not in summary and "error" not in summary


def test_head_mixing_dropout_case_drops_in_every_variant():
    """head-mixing-attention-dropout: ours, the naive form and SDPA all train with dropout 0.1 (two
    forwards differ), FlexAttention (no dropout) is left out, and it is not in a bare run."""
    from subspace_ops.bench.harness import run_case

    case, cpu = CASES["head-mixing-attention-dropout"], torch.device("cpu")
    assert not case.in_default_run
    variants = {v.name: v for v in case.make_variants("cpu")}
    assert "flex" not in variants and {"subspace_ops", "naive", "naive+compile", "sdpa"} <= set(variants)
    chosen = [variants[name] for name in ("subspace_ops", "naive", "sdpa")]
    for variant in chosen:
        workload = variant.setup((1, 2, 16, 8), torch.float32, cpu)
        first, second = workload.forward(), workload.forward()
        assert first.shape == (1, 2, 16, 8) and not torch.equal(first, second), variant.name
    rows = run_case(case, (1, 2, 16, 8), dtype=torch.float32, device=cpu, modes=("fwd+bwd",), repeats=1, warmup=1,
                    variants=chosen, measure_memory=False)
    assert [r.status for r in rows] == ["ok"] * 3, [r.note for r in rows]


def test_reproduction_update_checks_its_file_before_building_the_tables(tmp_path, capsys, monkeypatch):
    from subspace_ops.bench import reproduction

    monkeypatch.setattr(reproduction, "parameter_table", lambda: pytest.fail("built the tables first"))
    no_section = tmp_path / "notes.md"
    no_section.write_text("no generated section here\n")
    for path, message in ((no_section, "has no <!-- BEGIN GENERATED TABLE -->"),
                          (tmp_path / "missing.md", "cannot read")):
        with pytest.raises(SystemExit) as exc:
            reproduction.main(["--update", str(path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "argument --update" in err and message in err
