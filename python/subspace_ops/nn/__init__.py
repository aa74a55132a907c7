"""``nn.Module`` layers that wrap pretrained modules with a PEFT method on subspace_ops kernels."""

from .rescaled import RLRRLinear, ScaledLinear, SSF

__all__ = ["RLRRLinear", "ScaledLinear", "SSF"]
