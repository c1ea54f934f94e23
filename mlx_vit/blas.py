"""Give MLX's Linux CPU build a real BLAS.

The `mlx[cpu]` wheel links against a bundled reference BLAS that runs a float32 matmul at ~5 GFLOP/s. Loading an
optimized BLAS into the global symbol scope *before* `mlx.core` is imported makes the dynamic linker resolve
MLX's `cblas_*`/`sgemm_` calls to it instead (~180 GFLOP/s with OpenBLAS on our 2-core dev machine).

Set `MLX_VIT_BLAS` to a library path to choose one, or to `none` to keep MLX's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass


@dataclass
class BlasInfo:
    name: str  # "OpenBLAS 0.3.21", "MKL", "reference (bundled with mlx)", "Accelerate/Metal"
    path: str | None
    note: str = ""


_info: BlasInfo | None = None


def _candidates() -> list[str]:
    found = []
    for name in ("openblas", "mkl_rt"):
        lib = ctypes.util.find_library(name)
        if lib:
            found.append(lib)
    # pip's `mkl` package installs libmkl_rt into the environment, where find_library does not look.
    found += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    return found


def _describe(lib: ctypes.CDLL, path: str) -> str:
    try:
        get_config = lib.openblas_get_config
    except AttributeError:
        return "MKL" if "mkl" in os.path.basename(path) else os.path.basename(path)
    get_config.restype = ctypes.c_char_p
    version = get_config().decode(errors="replace").split()
    return " ".join(version[:2]) if version else "OpenBLAS"


def load_blas() -> BlasInfo:
    """Load the best BLAS available into the global symbol scope; safe to call more than once."""
    global _info
    if _info is not None:
        return _info
    if sys.platform == "darwin":
        _info = BlasInfo("Accelerate (CPU) / Metal (GPU)", None)
        return _info
    if not sys.platform.startswith("linux"):
        _info = BlasInfo("whatever mlx was built with", None)
        return _info

    choice = os.environ.get("MLX_VIT_BLAS", "").strip()
    late = "mlx.core" in sys.modules
    if choice.lower() == "none":
        _info = BlasInfo("reference (bundled with mlx)", None, "MLX_VIT_BLAS=none")
        return _info
    for path in [choice] if choice else _candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        note = "loaded after mlx.core was imported, so MLX may not use it" if late else ""
        _info = BlasInfo(_describe(lib, path), path, note)
        return _info
    hint = (
        "slow: install OpenBLAS (Debian/Ubuntu: apt install libopenblas0-pthread) or `pip install mkl`, then run again"
    )
    if choice:
        hint = f"could not load MLX_VIT_BLAS={choice}"
    _info = BlasInfo("reference (bundled with mlx)", None, hint)
    return _info


def blas_info() -> BlasInfo:
    return _info if _info is not None else load_blas()
