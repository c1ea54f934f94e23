"""Give MLX's Linux CPU build a real BLAS.

The `mlx[cpu]` wheel links against a bundled reference BLAS that runs a float32 matmul at ~5 GFLOP/s. Loading an
optimized BLAS into the global symbol scope *before* `mlx.core` is imported makes the dynamic linker resolve
MLX's `cblas_*`/`sgemm_` calls to it instead (~180 GFLOP/s with OpenBLAS on our 2-core dev machine).

Set `MLX_VIT_BLAS` to a library path to choose one, or to `none` to keep MLX's own.

An OpenBLAS built with DYNAMIC_ARCH picks its kernels when it loads, by the CPU model it knows. On a CPU newer
than the build (Debian's 0.3.21 on recent Xeons) it falls back to generic "Prescott" kernels (matmuls ~4x
slower). So the core it picked is read back, and when it needs less than the CPU's own flags offer (AVX-512,
AVX2, AVX), the kernels are chosen again, for those flags, before anything calls BLAS (so not when mlx.core came
first). A user's own OPENBLAS_CORETYPE is never overridden; `mlx-vit --version` names the core and says when it
looks wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import stat
import sys
from dataclasses import dataclass


@dataclass
class BlasInfo:
    name: str  # "OpenBLAS 0.3.21", "MKL", "reference (bundled with mlx)", "Accelerate/Metal"
    path: str | None
    note: str = ""
    core: str | None = None  # OpenBLAS's kernels: "SkylakeX", "Haswell", ...
    fix: str = ""  # when this BLAS is known to be slow here (and not by the user's choice): how to make it fast


# The instruction set each x86 OpenBLAS core's kernels use: 0 SSE, 1 AVX, 2 AVX2 + FMA, 3 AVX-512.
CORE_LEVELS = {
    **dict.fromkeys(("katmai", "coppermine", "northwood", "prescott", "banias", "core2", "penryn", "dunnington",
                     "nehalem", "atom", "nano", "opteron", "opteron_sse3", "barcelona", "bobcat"), 0),
    **dict.fromkeys(("sandybridge", "bulldozer", "piledriver", "steamroller"), 1),
    **dict.fromkeys(("haswell", "excavator", "zen"), 2),
    **dict.fromkeys(("skylakex", "cooperlake", "sapphirerapids"), 3),
}  # fmt: skip
CORE_FOR_LEVEL = {1: "SandyBridge", 2: "Haswell", 3: "SkylakeX"}
LEVEL_NAMES = {0: "SSE", 1: "AVX", 2: "AVX2", 3: "AVX-512"}
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what OpenBLAS's SkylakeX kernels use


def cpu_level(flags: set[str]) -> int:
    """The widest vector instruction set in the CPU's flags (/proc/cpuinfo), on CORE_LEVELS' scale."""
    if _AVX512 <= flags:
        return 3
    if {"avx2", "fma"} <= flags:
        return 2
    return 1 if "avx" in flags else 0


def better_core(core: str, flags: set[str]) -> str | None:
    """The OpenBLAS core to use instead of `core` on a CPU with `flags`; None when `core` is right (or unknown)."""
    level = CORE_LEVELS.get(core.lower())
    want = cpu_level(flags)
    return CORE_FOR_LEVEL[want] if level is not None and want > level else None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _corename(lib: ctypes.CDLL) -> str | None:
    try:
        get = lib.openblas_get_corename
    except AttributeError:
        return None
    get.restype = ctypes.c_char_p
    return (get() or b"").decode(errors="replace").strip() or None


def switch_core(lib: ctypes.CDLL, core: str) -> str | None:
    """Make a DYNAMIC_ARCH OpenBLAS choose its kernels again, as `core`; the core in use after.

    gotoblas_dynamic_init reads OPENBLAS_CORETYPE as it does when the library loads. Called before any BLAS call,
    this is the choice the library would have made at load: its buffers are sized for every core it was built
    with. The variable is set only for that call, so child processes choose for themselves.
    """
    try:
        quit_, init = lib.gotoblas_dynamic_quit, lib.gotoblas_dynamic_init
    except AttributeError:  # not a DYNAMIC_ARCH build: its kernels are fixed
        return _corename(lib)
    os.environ["OPENBLAS_CORETYPE"] = core
    try:
        quit_()
        init()
    finally:
        del os.environ["OPENBLAS_CORETYPE"]
    return _corename(lib)


def _fit_core(lib: ctypes.CDLL, late: bool) -> tuple[str | None, str, str]:
    """(the OpenBLAS core in use, a note, how to fix it if it is slow): chosen again when OpenBLAS fell back below
    what the CPU runs, unless the user chose it or it may be in use already (`late`: mlx.core was imported first)."""
    core = _corename(lib)
    if core is None:
        return None, "", ""
    flags = cpu_flags()
    better = better_core(core, flags)
    if better is None:
        return core, "", ""
    cpu = LEVEL_NAMES[cpu_level(flags)]
    if os.environ.get("OPENBLAS_CORETYPE"):
        note = f"core {core} looks wrong for this {cpu} CPU (OPENBLAS_CORETYPE is set; {better} would be faster)"
        return core, note, ""  # the user's choice, as MLX_VIT_BLAS=none is: said by --version, not warned about
    if late:
        note = f"core {core} looks wrong for this {cpu} CPU (import mlx_vit first; {better} would be faster)"
        return core, note, "import mlx_vit before mlx.core, so that mlx-vit chooses the kernels first"
    switched = switch_core(lib, better)
    if switched and switched.lower() != core.lower():
        return switched, f"OpenBLAS chose {core} for this CPU; mlx-vit chose {switched} for its {cpu}", ""
    note = f"core {core} looks wrong for this {cpu} CPU ({better} would be faster; it could not be chosen)"
    return core, note, f"run with OPENBLAS_CORETYPE={better}, or install a newer OpenBLAS"


INSTALL_HINT = (
    "install OpenBLAS (Debian/Ubuntu: sudo apt install libopenblas0-pthread) or `pip install mkl`, then run again"
)

_info: BlasInfo | None = None
_lib: ctypes.CDLL | None = None  # the BLAS loaded, for set_threads


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
    global _info, _lib
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
            if "/" in path and not stat.S_ISREG(os.stat(path).st_mode):  # dlopen waits for ever on a FIFO
                continue
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except (OSError, ValueError):
            continue
        core, note, fix = _fit_core(lib, late)
        if late:
            note = "; ".join(filter(None, [note, "loaded after mlx.core was imported, so MLX may not use it"]))
        _info, _lib = BlasInfo(_describe(lib, path), path, note, core, fix), lib
        return _info
    hint = f"slow: {INSTALL_HINT}"
    fix = INSTALL_HINT
    if choice:
        hint = f"could not load MLX_VIT_BLAS={choice}"
        fix = "point MLX_VIT_BLAS at an OpenBLAS or MKL library (libopenblas.so.0, libmkl_rt.so), or unset it"
    _info = BlasInfo("reference (bundled with mlx)", None, hint, fix=fix)
    return _info


def blas_info() -> BlasInfo:
    return _info if _info is not None else load_blas()


_warned = False


def warn_if_slow() -> bool:
    """Warn once a process, through the "mlx_vit" logger, when the BLAS in use is known to be slow (MLX's reference
    BLAS: ~20-35x slower than OpenBLAS; OpenBLAS kernels below what the CPU runs: ~4x), saying how to fix it.
    Library runs call it before a run of more than a few images; `MLX_VIT_QUIET=1` silences it. True if it warned.
    """
    global _warned
    info = blas_info()
    if _warned or not info.fix or os.environ.get("MLX_VIT_QUIET", "").strip() not in ("", "0"):
        return False
    _warned = True
    if info.path is None:  # MLX's own
        why = "MLX's bundled reference BLAS, ~20-35x slower than OpenBLAS"
        why += f"; {info.note}" if info.note and not info.note.startswith("slow:") else ""
    else:
        why = f"{info.name}: {info.note}"
    logging.getLogger("mlx_vit").warning("slow BLAS (%s): %s (MLX_VIT_QUIET=1 hides this)", why, info.fix)
    return True


def shares_threads(threads: int) -> bool:
    """Whether several threads may each call this BLAS with `threads` threads of its own (CPU lanes): not
    Accelerate, whose threads are its own, nor, beyond one, an OpenMP OpenBLAS, whose count is per calling thread."""
    if sys.platform == "darwin":
        return False
    parallel = getattr(_lib, "openblas_get_parallel", None)
    return threads == 1 or parallel is None or parallel() != 2  # 0 single-threaded, 1 pthreads, 2 OpenMP


def set_threads(count: int) -> bool:
    """Let each BLAS call use `count` threads (OpenBLAS or MKL, as loaded here); False when it cannot be set."""
    for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        function = getattr(_lib, name, None)
        if function is not None:
            function(ctypes.c_int(count))
            return True
    return False
