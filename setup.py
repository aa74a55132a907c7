"""Build script: the Python package plus the optional C++ CPU extension `subspace_ops._C`.

The extension is compiled against the torch that is already installed, so build with
`pip install --no-build-isolation .` (build isolation would pull a fresh, multi-GB torch).
Set SUBSPACE_OPS_NO_EXT=1 to install the pure-Python package only; the `cpu` backend then
reports itself unavailable and says why.
"""

import glob
import os

from setuptools import setup

PACKAGE_DIR = {"": "python", "subspace_ops.triton_kernels": "triton_kernels"}
PACKAGES = [
    "subspace_ops",
    "subspace_ops.ops",
    "subspace_ops.nn",
    "subspace_ops.bench",
    "subspace_ops.triton_kernels",
]


def extension_modules():
    if os.environ.get("SUBSPACE_OPS_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # Kernel sources are shared with CMakeLists.txt (ctest); bindings.cpp is the Python glue.
    sources = sorted(glob.glob("csrc/*.cpp"))
    ext = CppExtension(
        name="subspace_ops._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        # -fopenmp: at::parallel_for is header-inline and only runs in parallel under OpenMP.
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
