"""The public functional ops, each registered in the ``subspace_ops::`` torch.library namespace."""

from .head_mixing_attention import head_mixing_attention
from .lowrank_linear import lowrank_linear
from .rescaled_linear import rescaled_linear
from .svd_delta_linear import svd_delta_linear

__all__ = ["head_mixing_attention", "lowrank_linear", "rescaled_linear", "svd_delta_linear"]
