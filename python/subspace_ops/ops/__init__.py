"""The public functional ops, each registered in the ``subspace_ops::`` torch.library namespace."""

from .rescaled_linear import rescaled_linear

__all__ = ["rescaled_linear"]
