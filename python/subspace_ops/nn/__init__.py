"""``nn.Module`` layers that wrap pretrained modules with a PEFT method on subspace_ops kernels."""

from .adapters import NotMergeableError, ParallelAdapterLinear, SequentialAdapter, SpectralLinear
from .attention import CoeffAttnProcessor, HeadMix, TimmCoeffAttention
from .experts import LowRankExperts
from .lowrank import DoRALinear, LowRankLinear
from .rescaled import RLRRLinear, ScaledLinear, SSF
from .svd import SVD_METHODS, SVDLinear

__all__ = ["CoeffAttnProcessor", "DoRALinear", "HeadMix", "LowRankExperts", "LowRankLinear", "NotMergeableError",
           "ParallelAdapterLinear", "SequentialAdapter", "SpectralLinear", "TimmCoeffAttention", "RLRRLinear",
           "ScaledLinear", "SSF", "SVDLinear", "SVD_METHODS"]
