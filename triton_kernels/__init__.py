"""Triton GPU kernels, installed as ``subspace_ops.triton_kernels``.

Each module holds the kernels of one op family plus thin launch wrappers that take and return
torch tensors; autograd and torch.library registration live in ``subspace_ops.ops``.
"""
