"""Builds what pyproject.toml cannot declare: the optional C kernel, and the weights in the wheel.

The kernel (hybrid_codec/_fast.c) is optional: without a C compiler the install still
succeeds and the codec runs on PyTorch alone (see hybrid_codec/fast.py).
"""

import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


def kernel_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags: optimized, OpenMP where the compiler has it, no -ffast-math
    (the kernel relies on NaN and infinity behaving as IEEE 754 says)."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    if sys.platform == "darwin":  # Apple's clang has no OpenMP: the kernel is then used on one thread only
        return flags, []
    return [*flags, "-fopenmp"], ["-fopenmp"]


class BuildPyWithWeights(build_py):
    """Copies the shipped weights (weights/ at the top of the repository) into the package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "hybrid_codec" / "weights"
        target.mkdir(parents=True, exist_ok=True)
        for weights in Path("weights").glob("*.safetensors"):
            shutil.copy2(weights, target / weights.name)


compile_flags, link_flags = kernel_flags()
setup(
    ext_modules=[
        Extension(
            "hybrid_codec._fast",
            ["hybrid_codec/_fast.c"],
            extra_compile_args=compile_flags,
            extra_link_args=link_flags,
            optional=True,
        )
    ],
    cmdclass={"build_py": BuildPyWithWeights},
)
