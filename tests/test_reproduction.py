"""The reproduction table: our parameter counts on the papers' backbones, checked by formula."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")
pytest.importorskip("transformers")

from subspace_ops.bench.reproduction import format_markdown, parameter_table  # noqa: E402

D, FF, LAYERS = 768, 3072, 12  # ViT-B/16 and RoBERTa-base share these sizes


@pytest.mark.integration
def test_counts_match_formulas():
    rows = {(r.method, r.backbone): r for r in parameter_table()}
    per_linear = lambda n, k: n + k + n  # noqa: E731  RLRR: s_l, s_r, shift
    rlrr_block = 3 * per_linear(D, D) + per_linear(D, D) + per_linear(FF, D) + per_linear(D, FF) + 4 * D  # + SSF
    assert rows["RLRR", "ViT-B/16"].ours == LAYERS * rlrr_block + 4 * D == 288_768
    assert rows["Coeff-Tuning", "ViT-B/16"].ours == LAYERS * 12 * 12 == 1_728
    assert rows["ia3", "RoBERTa-base"].ours == LAYERS * (D + D + FF)  # k, v outputs; FFN input
    assert rows["ssl", "RoBERTa-base"].ours == LAYERS * (D + D + D)  # the other side of each
    assert rows["ssb", "RoBERTa-base"].ours == LAYERS * (2 * (D + D) + (FF + D))
    r = 8
    assert rows["lora", "RoBERTa-base"].ours == LAYERS * r * (4 * 2 * D + 2 * (D + FF)) == 1_327_104
    m = 32
    assert rows["adapter", "RoBERTa-base"].ours == LAYERS * 2 * (2 * D * m + m + D)
    assert rows["bitfit", "RoBERTa-base"].ours == 102_144  # 0.82‰ of 125 M, 001 Table 2
    for row in rows.values():
        assert row.paper and row.source and row.note
    assert format_markdown(list(rows.values())).count("\n") == len(rows) + 1
