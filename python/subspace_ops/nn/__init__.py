"""``nn.Module`` layers that wrap pretrained modules with a PEFT method on subspace_ops kernels."""

from .attention import HeadMix, TimmCoeffAttention
from .rescaled import RLRRLinear, ScaledLinear, SSF
from .svd import SVD_METHODS, SVDLinear

__all__ = ["HeadMix", "TimmCoeffAttention", "RLRRLinear", "ScaledLinear", "SSF", "SVDLinear", "SVD_METHODS"]
