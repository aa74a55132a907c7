"""Every method of the papers by name: a config dataclass per method and one ``apply``.

    from subspace_ops import methods

    model, report = methods.apply(model, "lora", rank=4)            # name + overrides
    model, report = methods.apply(model, methods.get_config("ssb"))  # or a config object
    loss = task_loss + methods.mpc_loss(model, "o", weight=0.1)      # MPC_o regularizer (001 eq. 20)

Canonical names (``list_methods()``), their category in paper 001's taxonomy (§3 reconstruction,
§4 extension, §5 combination) and the equation each layer implements are in :data:`METHODS`:

    name          category        the layer's formula (layer class)                 equation
    rlrr          combination     W + s_l ⊙ W ⊙ s_rᵀ, shift; SSF (RLRRLinear)        000 eq. 16
    ssf           reconstruction  y·γ + β after norms and patch embed (SSF)         000 §3 (RLRR's SSF part)
    ssb           reconstruction  D1 W D2 (ScaledLinear)                            001 eq. 7
    ssl           reconstruction  one side of eq. 7 (ScaledLinear)                  001 eq. 7, §3.2.2
    ia3           reconstruction  l ⊙ W = W D2 (ScaledLinear)                       001 §3.2.2
    siva          combination     W + U_I diag(s) V_Iᵀ, smallest σ (SVDLinear)      002 §3 (Theorem 2)
    sam-parser    reconstruction  U Σ* Vᵀ (SVDLinear)                               001 eq. 4
    svdiff        combination     U relu(Σ + D) Vᵀ (SVDLinear)                      001 eq. 34–35
    coeff         combination     O_h = Σ_g (I + α)[h, g] P_g V_h (HeadMix)         003 eq. 11–12
    bitfit        reconstruction  the model's own biases                            001 eq. 8–9
    lora          extension       W + s·A B (LowRankLinear g="none")                001 §4.1, eq. 12
    adalora       extension       W + s·A diag(g) B, + MPC_o (g="diag")             001 eq. 12–17, 20
    trilora       extension       W + s·A diag(g) B (g="diag")                      001 eq. 12–17
    flora         extension       W + s·A G B, G free r×r (g="full")                001 eq. 12, 19
    dora          combination     m ⊙ (W + s·AB)/‖W + s·AB‖ (DoRALinear)             001 eq. 27–28
    pa            extension       x Wᵀ + s·h(x Bᵀ) Aᵀ (ParallelAdapterLinear)       001 eq. 25–26
    adapter       extension       h + f(h W_downᵀ + b) W_upᵀ + b (SequentialAdapter) 001 eq. 22–23
    spectral      combination     [U_r + A, U_rest] Σ [V_r + B, V_rest]ᵀ            001 eq. 32–33
                                  (SpectralLinear)

Categories follow 001: §5 files a method that reconstructs *by adding* trainable components (rather than
altering the singular components themselves) under combination — so SVDiff, SiVA (additive on the
smallest singular values), RLRR (W plus a rescaled copy of W) and Coeff-Tuning (I + α: keeps the original
filter subspace and adds a learned recombination of it, 003 §4) are "combination", SAM-PARSER (tunes
Σ* directly) is "reconstruction".

**Targets.** Patterns are :func:`subspace_ops.adapters.find_modules` globs; the defaults name the layers
of timm ViTs (``qkv``, ``proj``, ``fc1``, ``fc2``), BERT/RoBERTa (``query``, ``key``, ``value``,
``*.intermediate.dense``, ``*.output.dense``) and LLaMA (``q_proj`` … ``down_proj``) at once, so one
config works on all three; a model's classification head, pooler and embeddings are not targeted.
Target patterns that match nothing raise ValueError, and so do ``trainable`` and ``exclude`` patterns
other than the defaults (which list several model families' heads). ``exclude`` names modules no target
reaches into (as PEFT's ``exclude_modules``; by default timm's relative-position MLPs, :data:`DEFAULT_EXCLUDE`).

**Fused qkv.** timm's fused ``qkv`` (and GPT-2's ``c_attn``) is split into q, k, v by ``rlrr``,
``siva``, ``sam-parser`` and ``svdiff``, and ``ia3``/``ssl``/``ssb`` scale its key and value parts only
(their layers support parts; ``fused_qkv="shared"`` on rlrr/ia3/ssl/ssb treats it as one matrix, as
PEFT does). Every other method treats it as one [3d, d] matrix, as PEFT does on timm models: LoRA &
co. get one A [3d, r] and one B [r, d] (4dr parameters instead of 6dr for three separate matrices),
the Spectral Adapter one SVD of the fused matrix.
On models with separate projections (RoBERTa, LLaMA) every method is the paper's.

**MoE experts.** transformers keeps a Mixture-of-Experts layer's experts as 3-D parameters of one
``*Experts`` module (Mixtral's ``gate_up_proj [E, 2I, H]``), which ``targets`` (nn.Linear modules) never
reaches. ``target_parameters`` on lora, adalora, trilora and flora names them (patterns as ``targets``, on
parameter names) and gives each expert its own factors, ``W_e + s·A_e G_e B_e``, applied as a parametrization
that forms the adapted parameter once per forward (:mod:`subspace_ops.nn.experts`). Without it, the report
(``details["experts_not_adapted"]``, its text) and a warning name the expert parameters left frozen.

**Trainable.** Every parameter not created by the method is frozen, except modules matching the config's
``trainable`` patterns (default :data:`DEFAULT_TRAINABLE`: the task head, ``head``, ``classifier``,
``score``, ..., trained in all the papers' experiments; nothing matches on a bare backbone). Layers inside
a ``trainable`` module get no adapter: they are trained in full. Parameters of methods applied earlier stay
trainable (methods combine, e.g. ``coeff`` after ``ssf``, or ``lora`` after ``bitfit``: a layer wrapping a
bias BitFit trains keeps it trainable). The report counts the method's parameters as
``adapter_params`` (for ``bitfit``: the unfrozen biases) and the head as ``other_trainable_params``.

**Errors** (unknown method name, unknown config field, invalid value, patterns matching nothing) raise
ValueError naming the argument; ``apply`` checks everything before changing the model and, should a
layer still fail while being built, restores the model's modules and ``requires_grad`` flags before
re-raising, so a failed ``apply`` leaves the model as it was.

**MPC** (001 §4.2). ``mpc="o"`` / ``"d"`` on a LoRA-family config (lora, adalora, trilora, flora, dora,
pa) records the regularizer to add to the loss — :func:`mpc_loss` computes it from every layer's
``low_rank_factors()``; ``mpc="n"`` (``lora`` only: 001 evaluates LoRA + MPC_n) builds the nonlinear
variant, a :class:`~subspace_ops.nn.adapters.ParallelAdapterLinear` with LoRA's rank, scaling and init —
which is exactly PA (001 Tables 2–4 list identical results for PA and LoRA + MPC_n).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import reference
from .adapters import (
    RLRR_LINEAR_TARGETS,
    RLRR_SSF_TARGETS,
    SVD_TARGETS,
    TASK_HEADS,
    AdaptReport,
    _finish_report,
    _matches,
    _start_report,
    apply_coeff,
    apply_rlrr,
    apply_svd,
    check_patterns_match,
    find_linears,
    find_modules,
    find_parameters,
    fused_qkv_splits,
    is_conv1d,
    no_linear_error,
    replace_module,
    ssf_layers,
    unadapted_expert_parameters,
)
from .backends import BACKENDS
from .nn import experts as experts_nn
from .nn.adapters import ACTIVATIONS, ParallelAdapterLinear, SequentialAdapter, SpectralLinear
from .nn.base import BITFIT_MARK
from .nn.lowrank import DoRALinear, LowRankLinear
from .nn.rescaled import ScaledLinear

__all__ = [
    "ADAPTER_TARGETS",
    "DEFAULT_EXCLUDE",
    "DEFAULT_TRAINABLE",
    "FFN_OUT_TARGETS",
    "KV_TARGETS",
    "LINEAR_TARGETS",
    "METHODS",
    "SSF_TARGETS",
    "MethodConfig",
    "MethodInfo",
    "RLRRConfig",
    "SSFConfig",
    "SSBConfig",
    "SSLConfig",
    "IA3Config",
    "SiVAConfig",
    "SAMParserConfig",
    "SVDiffConfig",
    "CoeffConfig",
    "BitFitConfig",
    "LoRAConfig",
    "AdaLoRAConfig",
    "TriLoRAConfig",
    "FLoRAConfig",
    "DoRAConfig",
    "PAConfig",
    "AdapterConfig",
    "SpectralConfig",
    "apply",
    "get_config",
    "list_methods",
    "low_rank_layers",
    "mpc_loss",
]

# ---------------------------------------------------------------------------------------------
# Default target patterns (timm ViT / BERT-RoBERTa / LLaMA / GPT-2 / diffusers names)
# ---------------------------------------------------------------------------------------------
#: diffusers' attention projections (UNets, DiTs: ``to_q``...; the text stream of joint attention:
#: ``add_q_proj``..., ``to_add_out``) and the output linear of its FeedForward (``ff.net.2``,
#: ``ff_context.net.2``, Wan's ``ffn.net.2``; the input one, ``net.0.proj``, matches ``proj``).
DIFFUSERS_Q, DIFFUSERS_K, DIFFUSERS_V = ("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")
DIFFUSERS_ATTENTION_OUT = ("to_out.0", "to_add_out")
DIFFUSERS_FFN_OUT = ("net.2",)
#: Other transformers families, by the names their blocks give q, k, v, the attention output and the FFN:
#: DistilBERT (``q_lin``, ``out_lin``, ``lin1/2``), DeBERTa-v2 (``query_proj``), OPT, BART, Whisper, CLIP,
#: SigLIP (``out_proj``), ALBERT (``attention.dense``, ``ffn``, ``ffn_output``), T5 (``q``, ``k``, ``v``, ``o``,
#: ``wi``/``wi_0``/``wi_1``, ``wo``), Phi (``self_attn.dense``), GPT-NeoX, Falcon, BLOOM (``query_key_value``,
#: ``attention.dense``, ``dense_h_to_4h``, ``dense_4h_to_h``), Phi-3 (``qkv_proj``, ``gate_up_proj``).
HF_Q, HF_K, HF_V = ("q_lin", "query_proj"), ("k_lin", "key_proj"), ("v_lin", "value_proj")
HF_ATTENTION_OUT = ("out_proj", "out_lin", "*attention.dense", "self_attn.dense", "o")
HF_FFN_IN = ("lin1", "ffn", "wi", "wi_0", "wi_1", "dense_h_to_4h", "gate_up_proj")
HF_FFN_OUT = ("lin2", "ffn_output", "wo", "dense_4h_to_h")
#: Fused projections: Phi-3's ``qkv_proj`` is [q; k; v] (split like timm's qkv, adapters.fused_qkv_splits);
#: GPT-NeoX's and BLOOM's ``query_key_value`` interleave q, k, v per head and Falcon's groups them per key/value
#: head, so every method treats it as one matrix, as PEFT does, and (IA)³/SSL/SSB and SiVA leave it out.
INTERLEAVED_QKV = ("query_key_value",)
HF_FUSED = ("qkv_proj",) + INTERLEAVED_QKV
#: A fused key/value projection, [k; v] along the output (timm's PVT-v2, Twins, attention pooling
#: ``attn_pool.kv``): LoRA-type methods adapt it as one matrix, (IA)³/SSL/SSB scale it whole (k and v
#: are both theirs); SiVA, which tunes v but not k, leaves it out.
FUSED_KV = ("kv",)
#: Every linear layer of the transformer blocks ("applied to all linear layers", 001 §6; timm's SwiGLU MLP,
#: EVA-02's and AIMv2's, has ``fc1_g`` and ``fc1_x`` for ``fc1``); GPT-2's are
#: transformers Conv1Ds (adapted on their memory, see adapters.find_linears). In diffusers models:
#: attention and feed-forward, and Flux's single-stream blocks' MLP input and joint output.
LINEAR_TARGETS = RLRR_LINEAR_TARGETS + (
    "query", "key", "value", "*.intermediate.dense", "*.output.dense",
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "c_attn", "c_proj", "c_fc", "fc1_g", "fc1_x",
) + FUSED_KV + HF_Q + HF_K + HF_V + HF_ATTENTION_OUT + HF_FFN_IN + HF_FFN_OUT + HF_FUSED \
    + DIFFUSERS_Q + DIFFUSERS_K + DIFFUSERS_V + DIFFUSERS_ATTENTION_OUT + DIFFUSERS_FFN_OUT + (
    "single_transformer_blocks.*.proj_mlp", "single_transformer_blocks.*.proj_out")
#: After every LayerNorm, the patch embedding and the final norm (RLRR / SSF), plus BERT's ``LayerNorm``s,
#: LLaMA-style RMSNorms (``input_layernorm``, ``post_attention_layernorm``; ``norm`` is the final one) and
#: transformers' vision towers: ViT/DeiT (``layernorm_before/after``, ``layernorm``, ``patch_embeddings``),
#: DINOv2 (``norm1/2``), CLIP/SigLIP (``layer_norm1/2``, ``pre_layrnorm``, ``post_layernorm``; their patch
#: embedding is a bare Conv2d with a [B, C, H, W] output, which SSF over the last dimension does not fit),
#: diffusers' BasicTransformerBlock (``norm1/2/3``; the affine-free norms of DiT blocks get none); the norms
#: of GPT-2 (``ln_1/2``, ``ln_f``), OPT/BART/Whisper (``self_attn_layer_norm``, ``encoder_attn_layer_norm``,
#: ``final_layer_norm``, ``layernorm_embedding``, ``layer_norm``), T5 (``layer_norm``, an RMSNorm),
#: DistilBERT (``sa_layer_norm``, ``output_layer_norm``), ALBERT (``full_layer_layer_norm``), Phi
#: (``final_layernorm``), Falcon/BLOOM (``ln_f``, ``word_embeddings_layernorm``), timm's pre-norm
#: (``norm_pre``: CLIP-style ViTs) and parallel blocks' ``in_norm`` (``vit_*_xp``).
SSF_TARGETS = RLRR_SSF_TARGETS + ("LayerNorm", "input_layernorm", "post_attention_layernorm", "patch_embeddings",
                                  "layernorm_before", "layernorm_after", "layernorm", "layer_norm1", "layer_norm2",
                                  "pre_layrnorm", "post_layernorm", "norm3", "ln_1", "ln_2", "ln_f",
                                  "self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm",
                                  "layernorm_embedding", "layer_norm", "sa_layer_norm", "output_layer_norm",
                                  "full_layer_layer_norm", "final_layernorm", "word_embeddings_layernorm",
                                  "norm_pre", "in_norm")
#: The key and value projections ((IA)³'s l_k, l_v; timm's fused qkv as a whole).
KV_TARGETS = ("k", "v", "qkv", "key", "value", "k_proj", "v_proj", "c_attn", "qkv_proj"
              ) + FUSED_KV + HF_K + HF_V + DIFFUSERS_K + DIFFUSERS_V
#: The FFN's second linear, whose *input* is the FFN's intermediate activation ((IA)³'s l_ff).
#: ``*[0-9].output.dense`` is BERT's ``layer.N.output.dense`` and not ``attention.output.dense``;
#: ``*.mlp.c_proj`` is GPT-2's (``attn.c_proj`` is the attention output).
FFN_OUT_TARGETS = ("fc2", "*[0-9].output.dense", "down_proj", "*.mlp.c_proj") + HF_FFN_OUT + DIFFUSERS_FFN_OUT
#: Houlsby: after the attention output projection and after the FFN, in every block.
ADAPTER_TARGETS = ("*.attn.proj", "fc2", "*.output.dense", "*.self_attn.o_proj", "*attention.o_proj",
                   "*.mlp.down_proj", "*.attn.c_proj", "*.mlp.c_proj", "*attn.out_proj", "*Attention.o"
                   ) + tuple(p for p in HF_ATTENTION_OUT if p not in ("out_proj", "o")) + HF_FFN_OUT \
    + DIFFUSERS_ATTENTION_OUT + DIFFUSERS_FFN_OUT
#: SiVA adapts the query and value projections (002 §4).
SIVA_TARGETS = SVD_TARGETS["siva"] + ("q_proj", "v_proj", "qkv_proj") + HF_Q + HF_V + DIFFUSERS_Q + DIFFUSERS_V
#: Modules trained in full besides the method's parameters: the task head, by the names timm (``head``, and
#: DeiT's distillation head ``head_dist``: adapters.TASK_HEADS) and transformers give it: ``classifier``
#: (BERT, ViT; DistilBERT's also has a ``pre_classifier``), ``score`` (the decoder LMs'
#: *ForSequenceClassification: LLaMA, GPT-2, ...), ``classification_head`` (BART, T5).
DEFAULT_TRAINABLE = TASK_HEADS + ("classifier", "pre_classifier", "score", "classification_head")
#: Modules the default targets would reach into but that are not the blocks' projections: timm's
#: relative-position MLPs, which map 2-D offsets to per-head biases (``rel_pos.mlp`` of the relpos ViTs,
#: Swin-V2-CR's ``meta_mlp``; their ``fc1`` has 2 inputs, fewer than any adapter rank).
DEFAULT_EXCLUDE = ("rel_pos", "meta_mlp")

MPC_KINDS = {"o": reference.mpc_orthogonal, "d": reference.mpc_diagonal}


# ---------------------------------------------------------------------------------------------
# Field checks (each error names the field)
# ---------------------------------------------------------------------------------------------
def _patterns(name: str, value: object, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of module-name patterns, got {value!r}") from None
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name} must contain non-empty strings, got {patterns!r}")
    if not patterns and not allow_empty:
        raise ValueError(f"{name} must name at least one module pattern")
    return patterns


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _number(name: str, value: object, *, low: float = -math.inf, high: float = math.inf,
            high_open: bool = False, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high or (high_open and value == high):
        bound = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return float(value)


def _choice(name: str, value: object, choices: Sequence[object]) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _backend(value: object) -> Optional[str]:
    return None if value is None else _choice("backend", value, BACKENDS)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@dataclass
class MethodConfig:
    """Base of every method's config: ``trainable`` = patterns of modules trained in full (the task head);
    ``exclude`` = patterns of modules that no target reaches into (as PEFT's ``exclude_modules``; default
    :data:`DEFAULT_EXCLUDE`). Neither gets an adapter inside. ``exclude`` does not apply to ``coeff``,
    which adapts attention modules, not layers named by patterns."""

    name: ClassVar[str] = ""
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        self.trainable = _patterns("trainable", self.trainable, allow_empty=True)
        self.exclude = _patterns("exclude", self.exclude, allow_empty=True)

    @property
    def not_adapted(self) -> tuple[str, ...]:
        """Modules whose insides get no adapter: the fully trained ones and the excluded ones."""
        return self.trainable + self.exclude

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}


@dataclass
class RLRRConfig(MethodConfig):
    """RLRR (000 eq. 16): rescaled linear layers ``W + s_l ⊙ W ⊙ s_rᵀ`` (+ shift) and SSF after the norms.

    Defaults are the paper's ViT recipe (000 §4: q, k, v, proj, fc1, fc2 of every block; SSF after every
    LayerNorm, the patch embedding and the final norm), via :func:`subspace_ops.adapters.apply_rlrr`.
    ``fused_qkv="split"`` gives timm's qkv separate q, k, v input scales (the paper's parameter count).
    """

    name: ClassVar[str] = "rlrr"
    targets: tuple[str, ...] = LINEAR_TARGETS
    ssf: bool = True
    ssf_targets: tuple[str, ...] = SSF_TARGETS
    fused_qkv: str = "split"
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = _patterns("targets", self.targets)
        self.ssf_targets = _patterns("ssf_targets", self.ssf_targets, allow_empty=not self.ssf)
        _choice("ssf", self.ssf, (True, False))
        _choice("fused_qkv", self.fused_qkv, ("split", "shared"))
        self.backend = _backend(self.backend)


@dataclass
class SSFConfig(MethodConfig):
    """SSF alone (RLRR's scale/shift part, 000 §3): ``y·γ + β`` after the modules matching ``targets``
    (LayerNorms and patch embeddings; other module types are skipped). Init γ ~ N(1, 0.02), β ~ N(0, 0.02)
    as RLRR/SSF — so not zero-init: the output changes slightly at attach."""

    name: ClassVar[str] = "ssf"
    targets: tuple[str, ...] = SSF_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = _patterns("targets", self.targets)


@dataclass
class _ScaledConfig(MethodConfig):
    """Shared by ssb / ssl / ia3 (001 §3.2, eq. 7): scale vectors, initialized to one, on ``targets`` (the
    key and value projections) and ``ff_targets`` (the FFN's second linear). 001 §6 applies (IA)³, SSL and
    SSB to the keys, values and the FFN's intermediate activation, following (IA)³.

    Which side is scaled (torch's nn.Linear: "left" = the output features, s_l [N]; "right" = the input
    features, s_r [K]): (IA)³ rescales the keys, values (outputs of k, v: left) and the intermediate
    activation (the input of the FFN's second linear: right). SSL scales the other singular subspace of each
    matrix (k, v: right; FFN: left) and SSB both. This reproduces 001's parameter budgets: on RoBERTa-base
    (IA)³ = 12·(768 + 768 + 3072) = 55 296 (0.44‰ in Table 2), SSL = 12·3·768 = 27 648 (0.22‰),
    SSB = 82 944 (0.66‰). Either group may be set to ``()`` to skip it.

    A fused q, k, v projection among ``targets`` (timm's ``qkv``, GPT-2's ``c_attn``) is split
    (``fused_qkv="split"``, the default): its key and value parts get the scales separate k and v
    layers would get and its query part is left alone, so the count and the function are those of
    separate projections (ViT-B (IA)³: 12·(768 + 768 + 3072)). ``fused_qkv="shared"`` scales the
    whole fused matrix as one layer, as PEFT's (IA)³ does on timm's ``qkv`` (queries too).
    """

    targets: tuple[str, ...] = KV_TARGETS
    ff_targets: tuple[str, ...] = FFN_OUT_TARGETS
    fused_qkv: str = "split"
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = _patterns("targets", self.targets, allow_empty=True)
        self.ff_targets = _patterns("ff_targets", self.ff_targets, allow_empty=True)
        if not self.targets and not self.ff_targets:
            raise ValueError("targets and ff_targets are both empty: nothing to adapt")
        _choice("fused_qkv", self.fused_qkv, ("split", "shared"))
        self.backend = _backend(self.backend)


@dataclass
class SSBConfig(_ScaledConfig):
    __doc__ = "SSB (001 eq. 7, ``D1 W D2``): both sides scaled. " + _ScaledConfig.__doc__
    name: ClassVar[str] = "ssb"


@dataclass
class SSLConfig(_ScaledConfig):
    __doc__ = "SSL (001 §3.2.2): one singular subspace scaled, the side (IA)³ does not. " + _ScaledConfig.__doc__
    name: ClassVar[str] = "ssl"


@dataclass
class IA3Config(_ScaledConfig):
    __doc__ = "(IA)³ (001 §3.2.2, ``l ⊙ W = W D2``): keys, values and FFN activation rescaled. " + _ScaledConfig.__doc__
    name: ClassVar[str] = "ia3"


@dataclass
class SiVAConfig(MethodConfig):
    """SiVA (002): tune the k smallest singular values of the query and value projections, k per layer =
    the directions outside the top ``perc`` of the variance (σ²); 0.95 is the paper's ViT/RoBERTa value
    (0.997 for LLaMA-2). ``rank`` fixes k instead. ``path``: see :class:`~subspace_ops.nn.SVDLinear`."""

    name: ClassVar[str] = "siva"
    targets: tuple[str, ...] = SIVA_TARGETS
    perc: float = 0.95
    criterion: str = "variance"
    rank: Optional[int] = None
    path: Optional[str] = None
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = _patterns("targets", self.targets)
        self.perc = _number("perc", self.perc, low=0.0, high=1.0)
        if self.perc == 0.0:
            raise ValueError("perc must be in (0, 1], got 0.0")
        _choice("criterion", self.criterion, ("variance", "magnitude"))
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0):
            raise ValueError(f"rank must be None or an int >= 0, got {self.rank!r}")
        _choice("path", self.path, (None, "merged", "unmerged"))
        self.backend = _backend(self.backend)


@dataclass
class _SVDConfig(MethodConfig):
    targets: tuple[str, ...] = LINEAR_TARGETS
    path: Optional[str] = None
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = _patterns("targets", self.targets)
        _choice("path", self.path, (None, "merged", "unmerged", "basis"))  # basis: every singular direction
        self.backend = _backend(self.backend)


@dataclass
class SAMParserConfig(_SVDConfig):
    """SAM-PARSER (001 eq. 4, ``W* = U Σ* Vᵀ``): all singular values of every linear layer are tuned
    (s starts at σ). The original targets SAM's neck; 001 applies it to all linear layers (§6)."""

    name: ClassVar[str] = "sam-parser"


@dataclass
class SVDiffConfig(_SVDConfig):
    """SVDiff (001 eq. 34–35, ``U relu(Σ + D) Vᵀ``): a spectral shift D (zero init) on every linear layer."""

    name: ClassVar[str] = "svdiff"


@dataclass
class CoeffConfig(MethodConfig):
    """Coeff-Tuning (003 eq. 11–12): α [H, H] per attention layer, zero init, α' = I + Dropout(α).
    ``dropout``: 0 when α alone is tuned (003 §5), 0.1 with SSF. Applies to every attention block
    (timm ``Attention`` or transformers attention modules); raises if the model has none."""

    name: ClassVar[str] = "coeff"
    dropout: float = 0.0
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dropout = _number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        self.backend = _backend(self.backend)


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit (001 eq. 8–9): only bias terms train — every ``bias`` parameter of the modules matching
    ``targets`` (default all: linear and LayerNorm biases, 001 Table 2's 0.82‰ on RoBERTa-base). Nothing
    is added, so there is nothing to merge."""

    name: ClassVar[str] = "bitfit"
    targets: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = _patterns("targets", self.targets)


#: The LoRA family's G (001 eq. 17-19): LoRA none (G = I), AdaLoRA / TriLoRA diagonal, FLoRA a free r×r matrix.
G_BY_METHOD = {"lora": "none", "adalora": "diag", "trilora": "diag", "flora": "full"}


@dataclass
class _LowRankConfig(MethodConfig):
    """Shared by the LoRA family. ``rank`` r = 8 and ``alpha`` = 8 (s = alpha / r = 1): LoRA's RoBERTa
    setting (Hu et al. 2021: r = α = 8) and one of the four ranks 001 evaluates (2, 4, 8, 16); as in LoRA,
    α stays fixed when r changes (s = 8 / r). ``dropout`` on the adapter input (LoRA's lora_dropout).
    ``targets``: all linear layers (001 §6). ``target_parameters``: patterns (the rules of ``targets``, matched
    against parameter names) of 3-D Mixture-of-Experts expert parameters to adapt per expert (lora, adalora,
    trilora, flora; :mod:`subspace_ops.nn.experts`), default none; with them ``targets`` may be empty.
    ``mpc``: None, "o" (001 eq. 20) or "d" (eq. 21), the regularizer :func:`mpc_loss` adds with
    ``mpc_weight`` (001 gives no coefficient; 0.1 is AdaLoRA's γ for its own orthogonal regularizer, which
    is MPC_o); "n" (lora only) builds the nonlinear variant."""

    targets: tuple[str, ...] = LINEAR_TARGETS
    target_parameters: tuple[str, ...] = ()
    rank: int = 8
    alpha: Optional[float] = 8.0
    dropout: float = 0.0
    mpc: Optional[str] = None
    mpc_weight: float = 0.1
    backend: Optional[str] = None

    _mpc_kinds: ClassVar[tuple] = (None, "o", "d")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_parameters = _patterns("target_parameters", self.target_parameters, allow_empty=True)
        # Experts alone are a valid choice: targets=() then adapts no nn.Linear.
        self.targets = _patterns("targets", self.targets, allow_empty=bool(self.target_parameters))
        self.rank = _positive_int("rank", self.rank)
        self.alpha = _number("alpha", self.alpha, optional=True)
        self.dropout = _number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _choice("mpc", self.mpc, self._mpc_kinds)
        self.mpc_weight = _number("mpc_weight", self.mpc_weight, low=0.0)
        self.backend = _backend(self.backend)
        if self.target_parameters:
            self._check_target_parameters()

    @property
    def _additive(self) -> bool:
        """Whether the method's change is W + s·A G B alone (the LoRA family's G kinds), the only form a 3-D
        expert parameter can take: DoRA's row normalization and PA's / MPC_n's nonlinearity have no place
        in a weight read by the experts' own forward."""
        return self.name in G_BY_METHOD and self.mpc != "n"

    def _check_target_parameters(self) -> None:
        """Expert parameters get W + s·A G B added to the weight itself (nn/experts.py), which has no place for
        a nonlinearity, a per-row normalization or an input dropout."""
        if not self._additive:
            kind = "mpc='n'" if self.mpc == "n" else self.name
            raise ValueError(f"target_parameters: {kind} cannot adapt 3-D expert parameters (only an additive "
                             "W + s·A G B fits a weight read by the experts' own forward); use lora, adalora, trilora "
                             "or flora, or leave target_parameters empty")
        if self.dropout:
            raise ValueError(f"dropout must be 0 with target_parameters, got {self.dropout!r}: the expert delta is "
                             "added to the weight, so there is no adapter input to drop (PEFT refuses it too)")


@dataclass
class LoRAConfig(_LowRankConfig):
    __doc__ = ("LoRA (001 §4.1: ΔW = s·A B, A zero init). ``mpc='n'`` (MPC_n) puts ``activation`` between the "
               "two products (a ParallelAdapterLinear, not mergeable). " + _LowRankConfig.__doc__)
    name: ClassVar[str] = "lora"
    activation: str = "relu"
    _mpc_kinds: ClassVar[tuple] = (None, "o", "d", "n")

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("activation", self.activation, tuple(ACTIVATIONS))


@dataclass
class _DiagConfig(_LowRankConfig):
    init: str = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("init", self.init, ("lora", "adalora"))


@dataclass
class AdaLoRAConfig(_DiagConfig):
    __doc__ = ("AdaLoRA in 001's form (§4.1: ΔW = s·P Λ Q, Λ diagonal): LowRankLinear(g='diag') with AdaLoRA's "
               "init (``init='adalora'``: Λ = 0, P and Q ~ N(0, 0.02), AdaLoRA §3.1 / PEFT) and its orthogonal "
               "regularizer, which is MPC_o (``mpc='o'``, γ = ``mpc_weight`` = 0.1; 001 Tables 2–4's "
               "'AdaLoRA - MPC_o' rows are ``mpc=None``). AdaLoRA's budget schedule (rank pruning by importance) "
               "is not implemented: the rank stays r. " + _LowRankConfig.__doc__)
    name: ClassVar[str] = "adalora"
    init: str = "adalora"
    mpc: Optional[str] = "o"


@dataclass
class TriLoRAConfig(_DiagConfig):
    __doc__ = ("TriLoRA (001 §4.1: ΔW = s·A D B, D diagonal, no regularizer — 'TriLoRA + MPC_o' is "
               "``mpc='o'``): LowRankLinear(g='diag') with LoRA's init (A = 0, D = 1). " + _LowRankConfig.__doc__)
    name: ClassVar[str] = "trilora"


@dataclass
class FLoRAConfig(_LowRankConfig):
    __doc__ = ("FLoRA (001 §4.1, eq. 12: ΔW = s·A G B, G a free r×r matrix): LowRankLinear(g='full'), A = 0, "
               "G = I. " + _LowRankConfig.__doc__)
    name: ClassVar[str] = "flora"


@dataclass
class DoRAConfig(_LowRankConfig):
    __doc__ = ("DoRA (001 eq. 27: m ⊙ (W + s·AB)/‖W + s·AB‖_c): DoRALinear; m starts at ‖W‖ so the layer "
               "starts at W up to the rounding of m/‖W‖. ``detach_norm=True`` treats the norm as a constant in "
               "the backward, as the DoRA paper's §4.3 recommends (and PEFT does). " + _LowRankConfig.__doc__)
    name: ClassVar[str] = "dora"
    detach_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("detach_norm", self.detach_norm, (True, False))


@dataclass
class PAConfig(_LowRankConfig):
    __doc__ = ("Parallel adapter PA (001 eq. 25: xW + h(xA)B) beside every linear layer: ParallelAdapterLinear "
               "with h = ReLU (He et al. 2021a), rank = LoRA's r (001 compares PA and LoRA at equal parameter "
               "counts, Tables 2–4), LoRA's scaling and init (up-projection zero). Not mergeable unless "
               "``activation='identity'``. " + _LowRankConfig.__doc__)
    name: ClassVar[str] = "pa"
    activation: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("activation", self.activation, tuple(ACTIVATIONS))


@dataclass
class AdapterConfig(MethodConfig):
    """Houlsby adapter (001 eq. 22): a SequentialAdapter after the attention output projection and after the
    FFN of every block (``targets``). ``bottleneck`` m = 32 = 4·r at LoRA's r = 8: 001 aligns the adapter's
    budget with LoRA's (Table 2: HAdapter 2.50 / 4.87 / 9.59 / 19.03‰ = m 8 / 16 / 32 / 64 on RoBERTa-base,
    2·(2·768·m + 768 + m) per layer). ``activation`` f = GELU (the backbones' FFN nonlinearity)."""

    name: ClassVar[str] = "adapter"
    targets: tuple[str, ...] = ADAPTER_TARGETS
    bottleneck: int = 32
    activation: str = "gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = _patterns("targets", self.targets)
        self.bottleneck = _positive_int("bottleneck", self.bottleneck)
        _choice("activation", self.activation, tuple(ACTIVATIONS))


@dataclass
class SpectralConfig(MethodConfig):
    """Spectral Adapter (001 eq. 32–33): A [N, r], B [K, r] (zero init) added to the top r singular vectors
    of every linear layer (``targets``); r = 8 as the LoRA family (same parameter count, r·(N + K))."""

    name: ClassVar[str] = "spectral"
    targets: tuple[str, ...] = LINEAR_TARGETS
    rank: int = 8
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = _patterns("targets", self.targets)
        self.rank = _positive_int("rank", self.rank)
        self.backend = _backend(self.backend)


# ---------------------------------------------------------------------------------------------
# Appliers: config -> AdaptReport (the model is changed in place; nothing before the checks pass)
# ---------------------------------------------------------------------------------------------
def _match_linears(model: nn.Module, argument: str, patterns: Sequence[str],
                   skip_under: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    found = find_linears(model, patterns, skip_under=skip_under)
    if not found:
        error = no_linear_error(model, argument, patterns)
        if any(name.rpartition(".")[2] in INTERLEAVED_QKV for name, _ in model.named_modules()):
            raise ValueError(f"{error}; its q, k and v are one query_key_value layer, interleaved per head, "
                             "which cannot be split into q, k, v parts: adapt it whole with a LoRA-type method, "
                             "or name it in targets to scale it as one matrix")
        experts = unadapted_expert_parameters(model)
        if experts:  # a Mixture-of-Experts FFN: its projections are 3-D expert parameters, not nn.Linear
            raise ValueError(f"{error}; its feed-forward layers are Mixture-of-Experts experts stored as 3-D "
                             f"parameters (e.g. {experts[0]}), which only the LoRA-type methods adapt "
                             f"(target_parameters); pass {argument}=() to leave them out")
        raise error
    return found


def _replace_all(model: nn.Module, method: str, layers: list[tuple[str, nn.Module]],
                 trainable: Sequence[str], experts: Sequence[tuple[str, nn.Module, str, nn.Module]] = ()
                 ) -> AdaptReport:
    """Swap in layers built beforehand (so a failing constructor changes nothing), attach the expert
    parametrizations ``(name, owner, attribute, layer)``, and report."""
    report, backbone = _start_report(model, method)
    for name, layer in layers:
        replace_module(model, name, layer)
        report.layers.append(name)
    for name, owner, attribute, layer in experts:  # a failure is undone by apply (_restore_on_error)
        experts_nn.attach(owner, attribute, layer)
        report.layers.append(name)
    return _finish_report(model, report, backbone, trainable)


def _apply_per_linear(model: nn.Module, config: MethodConfig, make: Callable[[nn.Linear], nn.Module]) -> AdaptReport:
    linears = _match_linears(model, "targets", config.targets, config.not_adapted)  # type: ignore[attr-defined]
    return _replace_all(model, config.name, [(n, make(m)) for n, m in linears], config.trainable)


def _apply_rlrr(model: nn.Module, c: RLRRConfig) -> AdaptReport:
    return apply_rlrr(model, targets=c.targets, ssf=c.ssf, ssf_targets=c.ssf_targets, fused_qkv=c.fused_qkv,
                      trainable=c.trainable, exclude=c.exclude, backend=c.backend)


def _apply_ssf(model: nn.Module, c: SSFConfig) -> AdaptReport:
    layers = ssf_layers(model, c.targets, skip_under=c.not_adapted)
    if not layers:
        raise ValueError(f"targets {c.targets} match no LayerNorm, RMSNorm or patch embedding in "
                         f"{type(model).__name__}")
    return _replace_all(model, "ssf", layers, c.trainable)


# Which sides each method scales: (on targets = k, v) and (on ff_targets = FFN's second linear).
_SCALED_SIDES = {
    "ia3": (("left",), ("right",)),
    "ssl": (("right",), ("left",)),
    "ssb": (("left", "right"), ("left", "right")),
}


def _apply_scaled(model: nn.Module, c: _ScaledConfig) -> AdaptReport:
    groups = []
    for argument, patterns in (("targets", c.targets), ("ff_targets", c.ff_targets)):
        groups.append(_match_linears(model, argument, patterns, c.not_adapted) if patterns else [])
    both = {n for n, _ in groups[0]} & {n for n, _ in groups[1]}
    if both:
        raise ValueError(f"modules {sorted(both)} match both targets and ff_targets; each may be in one group")
    layers = []
    for group, (linears, sides) in enumerate(zip(groups, _SCALED_SIDES[c.name])):
        for name, linear in linears:
            parts: dict = {}
            splits = fused_qkv_splits(model, name, linear) if group == 0 and c.fused_qkv == "split" else None
            if splits is not None:  # [q; k; v]: scale k and v as separate layers would be, leave q alone.
                parts = {"splits": splits, "scaled_parts": (False, True, True)}
            layers.append((name, ScaledLinear(linear, left="left" in sides, right="right" in sides, method=c.name,
                                              backend=c.backend, **parts)))
    return _replace_all(model, c.name, layers, c.trainable)


def _apply_svd(model: nn.Module, c: Union[SiVAConfig, _SVDConfig]) -> AdaptReport:
    _match_linears(model, "targets", c.targets, c.not_adapted)
    options: dict = {"path": c.path}
    if isinstance(c, SiVAConfig):
        options.update(perc=c.perc, criterion=c.criterion, rank=c.rank)
    return apply_svd(model, c.name, targets=c.targets, trainable=c.trainable, exclude=c.exclude, backend=c.backend,
                     **options)


def _apply_coeff(model: nn.Module, c: CoeffConfig) -> AdaptReport:
    return apply_coeff(model, dropout=c.dropout, trainable=c.trainable, backend=c.backend, exclude=c.exclude)


def _apply_bitfit(model: nn.Module, c: BitFitConfig) -> AdaptReport:
    biases: dict[int, tuple[str, nn.Module, nn.Parameter]] = {}
    for name, module in find_modules(model, c.targets, skip_under=c.exclude):
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter) and bias.is_floating_point():
            biases.setdefault(id(bias), (name, module, bias))
    if not biases:
        raise ValueError(f"targets {c.targets} match no module with a bias parameter in {type(model).__name__}")
    report, backbone = _start_report(model, "bitfit")
    for name, module, bias in biases.values():
        bias.requires_grad_(True)
        setattr(module, BITFIT_MARK, True)  # so that methods applied later keep it trainable
        report.layers.append(name)
    report = _finish_report(model, report, backbone, c.trainable)
    # The biases are the method's parameters, but they belong to the backbone: count them as adapter
    # parameters (except those of the fully trained head, which stay "other").
    head = {id(p) for _, m in (find_modules(model, c.trainable) if c.trainable else []) for p in m.parameters()}
    moved = sum(b.numel() for key, (_, _, b) in biases.items() if key not in head)
    report.other_trainable_params -= moved
    report.adapter_params += moved
    return report


def _adalora_init(layer: LowRankLinear) -> LowRankLinear:
    """AdaLoRA §3.1 (and PEFT's AdaLoRA): Λ = 0, P and Q ~ N(0, 0.02); ΔW = 0 at attach through Λ."""
    with torch.no_grad():
        layer.lora_g.zero_()
        layer.lora_a.normal_(0.0, 0.02)
        layer.lora_b.normal_(0.0, 0.02)
    return layer


def _apply_lowrank(model: nn.Module, c: _LowRankConfig) -> AdaptReport:
    kw = dict(alpha=c.alpha, dropout=c.dropout, backend=c.backend)
    if isinstance(c, PAConfig) or (isinstance(c, LoRAConfig) and c.mpc == "n"):  # PA = LoRA + MPC_n
        make = lambda lin: ParallelAdapterLinear(lin, c.rank, activation=c.activation, **kw)  # noqa: E731
    elif isinstance(c, DoRAConfig):
        make = lambda lin: DoRALinear(lin, c.rank, detach_norm=c.detach_norm, **kw)  # noqa: E731
    else:
        g = G_BY_METHOD[c.name]
        init = getattr(c, "init", "lora")

        def make(lin: nn.Linear) -> nn.Module:
            layer = LowRankLinear(lin, c.rank, g=g, **kw)
            return _adalora_init(layer) if init == "adalora" else layer

    linears = _match_linears(model, "targets", c.targets, c.not_adapted) if c.targets else []
    experts = _expert_layers(model, c)
    report = _replace_all(model, c.name, [(n, make(m)) for n, m in linears], c.trainable, experts)
    if experts:
        report.details["expert_parameters"] = {
            name: f"{layer.num_experts} experts, out={layer.out_features}, in={layer.in_features}, "
                  f"layout={layer.layout}, rank={layer.rank}" for name, _, _, layer in experts}
    _note_unadapted_experts(model, c, report)
    if c.mpc in MPC_KINDS:
        report.details["mpc"] = {"kind": c.mpc, "weight": c.mpc_weight}
    return report


def _match_expert_parameters(model: nn.Module, c: _LowRankConfig) -> list[tuple[str, nn.Module, str, str]]:
    """``(name, owner, attribute, layout)`` of the parameters ``c.target_parameters`` name; ValueError for a
    pattern matching nothing, a parameter that is not a 3-D float expert parameter of a known layout, or
    one adapted already."""
    found = find_parameters(model, c.target_parameters, skip_under=c.not_adapted)
    for pattern in c.target_parameters:
        if not any(_matches(name, (pattern,)) for name, _, _ in found):
            known = unadapted_expert_parameters(model)
            hint = f"; its expert parameters include {known[:4]}" if known else "; it has no 3-D expert parameters"
            raise ValueError(f"target_parameters pattern {pattern!r} matches no parameter of {type(model).__name__} "
                             f"(outside trainable/exclude){hint}")
    matched = []
    for name, owner, attribute in found:
        if torch.nn.utils.parametrize.is_parametrized(owner, attribute):
            raise ValueError(f"target_parameters: {name} already has a parametrization (adapted by an earlier "
                             "apply?); a parameter takes one expert adapter")
        param = getattr(owner, attribute)
        if param.dim() != 3 or not param.is_floating_point():
            raise ValueError(f"target_parameters {c.target_parameters} match {name}, a {param.dim()}-D {param.dtype} "
                             f"parameter of shape {tuple(param.shape)}; they must name 3-D float expert parameters "
                             "[E, out, in] or [E, in, out] (name 2-D weights' modules in targets)")
        layout = experts_nn.expert_layout(owner)
        if layout is None:
            raise ValueError(f"target_parameters: {name} belongs to {type(owner).__name__}, whose layout ([E, out, in] "
                             "or [E, in, out]) is unknown: transformers' experts modules declare it (is_transposed, "
                             "@use_experts_implementation); for another class read its forward and add it to "
                             "subspace_ops.nn.experts.EXPERT_LAYOUTS")
        matched.append((name, owner, attribute, layout))
    return matched


def _expert_layers(model: nn.Module, c: _LowRankConfig) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """The expert layers of ``c.target_parameters``, built (and so checked) before anything changes."""
    if not c.target_parameters:
        return []
    g = G_BY_METHOD[c.name]
    init = getattr(c, "init", "lora")
    return [(name, owner, attribute, experts_nn.LowRankExperts(getattr(owner, attribute), c.rank, layout=layout,
                                                                 g=g, alpha=c.alpha, init=init))
            for name, owner, attribute, layout in _match_expert_parameters(model, c)]


def _note_unadapted_experts(model: nn.Module, c: _LowRankConfig, report: AdaptReport) -> None:
    """Say (report.details["experts_not_adapted"], str(report) and a warning) which Mixture-of-Experts
    expert parameters got no adapter: ``targets`` reaches nn.Linear modules only, so without
    ``target_parameters`` an MoE model's experts, most of its parameters, would stay frozen unnoticed."""
    names = unadapted_expert_parameters(model)
    if not names:
        return
    example = tuple(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))
    if not c._additive:
        how = f"{c.name} cannot adapt them; lora, adalora, trilora and flora can, with target_parameters={example}"
    else:
        how = f"to adapt them per expert, pass target_parameters={example}"
    message = (f"{len(names)} 3-D Mixture-of-Experts expert parameters (e.g. {names[0]}) were not adapted: targets "
               f"name nn.Linear modules only; {how}")
    report.details["experts_not_adapted"] = {"parameters": names, "message": message}
    warnings.warn(message, stacklevel=4)


def _output_features(module: nn.Module) -> Optional[int]:
    """A linear layer's output size: ``out_features`` (nn.Linear, adapted linears) or a Conv1D's ``nf``."""
    features = module.nf if is_conv1d(module) else getattr(module, "out_features", None)
    return features if isinstance(features, int) else None


def _apply_adapter(model: nn.Module, c: AdapterConfig) -> AdaptReport:
    found = [(n, m) for n, m in find_modules(model, c.targets, skip_under=c.not_adapted)
             if _output_features(m) is not None and not isinstance(m, SequentialAdapter)]
    if not found:
        raise ValueError(f"targets {c.targets} match no module with out_features (nn.Linear, transformers Conv1D "
                         f"or an adapted linear) in {type(model).__name__}")
    layers = [(n, SequentialAdapter(m, c.bottleneck, dim=_output_features(m), activation=c.activation))
              for n, m in found]
    return _replace_all(model, "adapter", layers, c.trainable)


def _apply_spectral(model: nn.Module, c: SpectralConfig) -> AdaptReport:
    return _apply_per_linear(model, c, lambda lin: SpectralLinear(lin, c.rank, backend=c.backend))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodInfo:
    """One registry entry. ``mergeable``: whether the adapted layers fold into the weights for inference
    (with the default config: ``lora`` with ``mpc='n'`` and ``pa`` with a nonlinearity are not; ``rlrr``
    and ``ssf`` are, except SSF after a norm without a bias, as LLaMA's and T5's RMSNorms, which has
    nowhere to put β: there ``merge_all`` raises NotMergeableError and merges nothing)."""

    name: str
    category: str  # "reconstruction" | "extension" | "combination" (001 §3 / §4 / §5)
    paper: str
    equation: str
    config: type
    mergeable: bool
    description: str = ""


_P000 = "000 RLRR (Low-Rank Rescaled fine-tuning with a Residual design)"
_P001 = "001 Subspace-Tuning (Si et al.)"
_P002 = "002 SiVA (Singular Value Adaptation)"
_P003 = "003 Coeff-Tuning (Miao et al.)"

METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("rlrr", "combination", _P000, "000 eq. 16", RLRRConfig, True,
                   "W + s_l ⊙ W ⊙ s_rᵀ and a shift on the linear layers, SSF after the norms"),
        MethodInfo("ssf", "reconstruction", _P000 + " / SSF (Lian et al. 2022)", "000 §3 (y·γ + β)", SSFConfig, True,
                   "scale and shift after every norm and the patch embedding"),
        MethodInfo("ssb", "reconstruction", _P001, "001 eq. 7", SSBConfig, True, "D1 W D2"),
        MethodInfo("ssl", "reconstruction", _P001, "001 eq. 7, §3.2.2", SSLConfig, True,
                   "one singular subspace scaled"),
        MethodInfo("ia3", "reconstruction", _P001 + " / (IA)³ (Liu et al. 2022)", "001 §3.2.2 (W D2)", IA3Config, True,
                   "keys, values and FFN activation rescaled"),
        MethodInfo("siva", "combination", _P002, "002 §3 (W + U_I diag(s) V_Iᵀ)", SiVAConfig, True,
                   "the smallest singular values of q and v tuned"),
        MethodInfo("sam-parser", "reconstruction", _P001 + " / SAM-PARSER (Peng et al. 2024)", "001 eq. 4",
                   SAMParserConfig, True, "all singular values tuned"),
        MethodInfo("svdiff", "combination", _P001 + " / SVDiff (Han et al. 2023)", "001 eq. 34–35", SVDiffConfig, True,
                   "spectral shift U relu(Σ + D) Vᵀ"),
        MethodInfo("coeff", "combination", _P003, "003 eq. 11–12", CoeffConfig, False,
                   "attention maps mixed across heads by I + α"),
        MethodInfo("bitfit", "reconstruction", _P001 + " / BitFit (Zaken et al. 2021)", "001 eq. 8–9", BitFitConfig,
                   True, "bias terms only"),
        MethodInfo("lora", "extension", _P001 + " / LoRA (Hu et al. 2021)", "001 §4.1 (ΔW = AB), eq. 12", LoRAConfig,
                   True, "ΔW = s·AB (mpc='n': nonlinear, not mergeable)"),
        MethodInfo("adalora", "extension", _P001 + " / AdaLoRA (Zhang et al. 2023)", "001 eq. 12–17, 20",
                   AdaLoRAConfig, True, "ΔW = s·A diag(g) B with the MPC_o regularizer"),
        MethodInfo("trilora", "extension", _P001 + " / TriLoRA (Feng et al. 2024)", "001 eq. 12–17", TriLoRAConfig,
                   True, "ΔW = s·A diag(g) B"),
        MethodInfo("flora", "extension", _P001 + " / FLoRA (Si et al. 2024)", "001 eq. 12, 19", FLoRAConfig, True,
                   "ΔW = s·A G B, G free r×r"),
        MethodInfo("dora", "combination", _P001 + " / DoRA (Liu et al. 2024)", "001 eq. 27–28", DoRAConfig, True,
                   "magnitude m and direction (W + s·AB)/‖W + s·AB‖"),
        MethodInfo("pa", "extension", _P001 + " / PA (He et al. 2021)", "001 eq. 25–26", PAConfig, False,
                   "parallel h(x Bᵀ) Aᵀ beside every linear layer"),
        MethodInfo("adapter", "extension", _P001 + " / Houlsby et al. 2019", "001 eq. 22–23", AdapterConfig, False,
                   "bottleneck adapter after attention and FFN"),
        MethodInfo("spectral", "combination", _P001 + " / Spectral Adapter (Zhang & Pilanci 2024)", "001 eq. 32–33",
                   SpectralConfig, True, "top-r singular vectors tuned additively"),
    )
}

_APPLIERS: dict[str, Callable[[nn.Module, MethodConfig], AdaptReport]] = {
    "rlrr": _apply_rlrr,
    "ssf": _apply_ssf,
    "ssb": _apply_scaled,
    "ssl": _apply_scaled,
    "ia3": _apply_scaled,
    "siva": _apply_svd,
    "sam-parser": _apply_svd,
    "svdiff": _apply_svd,
    "coeff": _apply_coeff,
    "bitfit": _apply_bitfit,
    "lora": _apply_lowrank,
    "adalora": _apply_lowrank,
    "trilora": _apply_lowrank,
    "flora": _apply_lowrank,
    "dora": _apply_lowrank,
    "pa": _apply_lowrank,
    "adapter": _apply_adapter,
    "spectral": _apply_spectral,
}


def list_methods(category: Optional[str] = None) -> list[str]:
    """The canonical method names (registry order), optionally of one category."""
    if category is not None:
        _choice("category", category, sorted({info.category for info in METHODS.values()}))
    return [name for name, info in METHODS.items() if category is None or info.category == category]


def _canonical(name: object) -> str:
    if not isinstance(name, str):
        raise ValueError(f"name must be a method name (str), got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"name {name!r} is not a known method; known: {', '.join(METHODS)}")
    return key


def _check_fields(config_cls: type, method: str, overrides: dict) -> None:
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {method} config field(s) {unknown}; {config_cls.__name__} fields: {sorted(known)}")


def get_config(name: str, **fields) -> MethodConfig:
    """The config of method ``name`` with its defaults, ``fields`` overriding them (validated)."""
    method = _canonical(name)
    cls = METHODS[method].config
    _check_fields(cls, method, fields)
    return cls(**fields)


def _resolve(config_or_name: Union[str, MethodConfig], overrides: dict) -> MethodConfig:
    if isinstance(config_or_name, MethodConfig):
        if type(config_or_name).name not in METHODS:
            raise ValueError(f"config_or_name: {type(config_or_name).__name__} is not a registered method config")
        _check_fields(type(config_or_name), config_or_name.name, overrides)
        return dataclasses.replace(config_or_name, **overrides) if overrides else config_or_name
    if isinstance(config_or_name, str):
        return get_config(config_or_name, **overrides)
    raise ValueError(f"config_or_name must be a method name or a MethodConfig, got {type(config_or_name).__name__}")


def _attn_implementation(model: nn.Module) -> Optional[str]:
    """A transformers model's attention implementation (``None`` for other models)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@contextmanager
def _restore_on_error(model: nn.Module) -> Iterator[None]:
    """Undo module replacements, expert adapters attached, requires_grad changes, a transformers
    attention-implementation switch and diffusers attention processors (Coeff-Tuning's) if the body raises."""
    from . import diffusers as diffusers_integration

    flags = [(p, p.requires_grad) for p in model.parameters()]
    children = [(m, dict(m._modules)) for m in model.modules()]
    expert_layers = {id(layer) for *_, layer in experts_nn.adapters(model)}
    attn = _attn_implementation(model)
    had_previous = hasattr(model, "_subspace_previous_attn")
    processors = diffusers_integration.processors(model)
    try:
        yield
    except BaseException:
        diffusers_integration.set_processors(model, processors)  # before _modules: a processor may be one
        # before _modules too: a parametrization swaps its module's class and moves the parameter
        for _, module, name, layer in experts_nn.adapters(model):
            if id(layer) not in expert_layers:
                experts_nn.detach(module, name)
        for module, kids in children:
            module._modules.clear()
            module._modules.update(kids)
        for p, flag in flags:
            p.requires_grad_(flag)
        if attn is not None and _attn_implementation(model) != attn:
            model.set_attn_implementation(attn)
        if not had_previous and "_subspace_previous_attn" in vars(model):
            del model._subspace_previous_attn
        raise


def _match_training_mode(model: nn.Module, existing: set[int]) -> None:
    """Give modules created by a method their parent's train/eval mode (new modules start in training
    mode, which would turn on adapter dropout in a model that is in eval mode)."""
    mode = {}
    for name, m in model.named_modules():  # parents before children
        if id(m) not in existing and name:
            m.training = mode[name.rpartition(".")[0]]
        mode[name] = m.training


def apply(model: nn.Module, config_or_name: Union[str, MethodConfig], **overrides) -> tuple[nn.Module, AdaptReport]:
    """Adapt ``model`` in place with a method given by name (plus config ``overrides``) or by config.

    Returns ``(model, report)``; ``report.details["config"]`` is the config used (and, for a LoRA-family
    config with ``mpc`` "o"/"d", ``report.details["mpc"]`` = ``{"kind", "weight"}`` for :func:`mpc_loss`).
    Raises ValueError — naming the argument, with the model unchanged — for an unknown method name, an
    unknown config field, an invalid value, or target patterns that match nothing.
    """
    config = _resolve(config_or_name, overrides)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    check_patterns_match(model, trainable=config.trainable, exclude=config.exclude)
    existing = {id(m) for m in model.modules()}
    with _restore_on_error(model):
        report = _APPLIERS[config.name](model, config)
    _match_training_mode(model, existing)
    report.method = config.name
    report.details["config"] = config
    return model, report


# ---------------------------------------------------------------------------------------------
# MPC regularizers (001 §4.2)
# ---------------------------------------------------------------------------------------------
def low_rank_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer with ``low_rank_factors()`` (LoRA family, DoRA, PA)."""
    return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "low_rank_factors", None))]


def mpc_loss(model: nn.Module, kind: str = "o", weight: float = 1.0) -> Tensor:
    """``weight · Σ_layers MPC(A, B)`` over every low-rank layer's ``low_rank_factors()`` (A [N, r], B [r, K]).

    ``kind`` "o": MPC_o, ``‖AᵀA − I‖²_F + ‖BBᵀ − I‖²_F`` (001 eq. 20, ``reference.mpc_orthogonal``);
    "d": MPC_d, ``‖BBᵀ − I‖²_F + ‖AᵀA − diag(AᵀA)‖²_F`` (eq. 21, ``reference.mpc_diagonal``: 001's A is the
    down projection, our B; its B the up projection, our A). Computed in
    float32 or better; differentiable in every A and B. Add it to the task loss. Raises ValueError if
    ``kind`` is not "o"/"d" or the model has no low-rank layer.
    """
    fn = MPC_KINDS.get(kind)  # type: ignore[arg-type]
    if fn is None:
        raise ValueError(f"kind must be 'o' (MPC_o, 001 eq. 20) or 'd' (MPC_d, eq. 21), got {kind!r}")
    weight = _number("weight", weight)
    layers = low_rank_layers(model)
    if not layers:
        raise ValueError(f"mpc_loss: {type(model).__name__} has no low-rank layers (lora, adalora, trilora, flora, "
                         "dora or pa); apply one of them first")
    total = None
    for _, layer in layers:
        a, b = layer.low_rank_factors()
        acc = torch.promote_types(a.dtype, torch.float32)
        # An expert layer's factors are [E, N, r] and [E, r, K]: one regularizer term per expert.
        for a_i, b_i in zip(a, b) if a.dim() == 3 else ((a, b),):
            term = fn(a_i.to(acc), b_i.to(acc))
            total = term if total is None else total + term
    return weight * total
