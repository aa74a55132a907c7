"""Trainable-parameter counts of our ``apply`` on the papers' backbones, next to the papers' numbers.

``python -m subspace_ops.bench.reproduction`` prints the markdown table of docs/REPRODUCTION.md.
Backbones are built from their configs on the meta device (no weights, no download): timm
``vit_base_patch16_224`` (100-class head), transformers RoBERTa-base (sequence classification, 2
labels). SiVA's k comes from the singular values of pretrained weights, which a meta model does not
have: its rows are computed from the k the papers' settings give and say so.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

__all__ = ["Row", "format_markdown", "parameter_table"]


@dataclasses.dataclass
class Row:
    method: str
    backbone: str
    ours: int  # adapter parameters our apply() adds
    head: int  # other trainable parameters (the task head)
    paper: str  # as printed
    source: str
    note: str


def _vit_b() -> nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)


def _roberta_base() -> nn.Module:
    import transformers

    config = transformers.RobertaConfig(attention_probs_dropout_prob=0.0, num_labels=2)  # roberta-base sizes
    with torch.device("meta"):
        return transformers.RobertaForSequenceClassification(config)


def _count(build: Callable[[], nn.Module], method: str, **overrides) -> tuple[int, int, int]:
    from .. import methods

    model = build()
    _, report = methods.apply(model, method, **overrides)
    return report.adapter_params, report.other_trainable_params, report.backbone_params


def parameter_table() -> list[Row]:
    rows: list[Row] = []
    adapter, head, _ = _count(_vit_b, "rlrr")
    rows.append(Row("RLRR", "ViT-B/16", adapter, head, "0.33 M", "000, VTAB-1k table (Params. (M))",
                    "0.33 M includes the task heads of VTAB (768·C + C, C ≤ 397); 288 768 + a ~50-class head "
                    "= 0.33 M. q, k, v counted as three matrices (timm's fused qkv split)."))
    adapter, head, _ = _count(_vit_b, "coeff")
    rows.append(Row("Coeff-Tuning", "ViT-B/16", adapter, head, "1,728", "003 §4.1",
                    "(12·12)·12 = 1 728: identical."))
    rows.append(Row("SiVA (k = 400 per q, v)", "ViT-B/16", 12 * 2 * 400, 0, "9.7K", "002 Table 1 (Stanford Cars)",
                    "k comes from pretrained singular values (perc 0.95); about 400 per matrix on ViT-B q/v, "
                    "i.e. 12·2·400 = 9 600 ≈ 9.7K. Random weights give another k, so this row is computed, not "
                    "applied."))
    _, _, backbone = _count(_roberta_base, "bitfit")
    nominal = 125e6  # 001 Table 2 divides by RoBERTa-base's nominal 125 M
    for method, paper in (("ia3", "0.44‰"), ("ssl", "0.22‰"), ("ssb", "0.66‰"), ("lora", "10.62‰"),
                          ("adapter", "9.59‰"), ("bitfit", "0.82‰")):
        adapter, head, _ = _count(_roberta_base, method)
        count = adapter
        if method == "bitfit":  # BitFit trains existing biases: count them outside the classifier head
            from .. import methods

            model = _roberta_base()
            methods.apply(model, "bitfit")
            trained = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
            count = sum(k for n, k in trained if not n.startswith("classifier"))
            head = sum(k for n, k in trained if n.startswith("classifier"))
        note = f"{1000 * count / nominal:.2f}‰ of the nominal 125 M ({1000 * count / backbone:.2f}‰ of the actual " \
               f"{backbone / 1e6:.1f} M); the classifier head is not counted, as in the table."
        if method == "bitfit":
            note = "every bias of the encoder; " + note
        if method == "lora":
            note = "r = 8 on query, key, value, attention output, intermediate and output dense; " + note
        rows.append(Row(method, "RoBERTa-base", count, head, paper,
                        "001 Table 2", note))
    return rows


def format_markdown(rows: list[Row]) -> str:
    lines = ["| method | backbone | ours (adapter) | + head | paper | source | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.backbone} | {r.ours:,} | {r.head:,} | {r.paper} | {r.source} | {r.note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_markdown(parameter_table()))
