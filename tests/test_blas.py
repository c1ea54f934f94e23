"""Choosing OpenBLAS's kernels for the CPU: the decision from given flags, and the real library switched over."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from mlx_vit.blas import better_core, cpu_flags, cpu_level

AVX512 = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
AVX2 = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize(
    "core, flags, wanted",
    [
        ("Prescott", AVX512, "SkylakeX"),  # Debian's 0.3.21 on a Xeon it does not know
        ("Prescott", AVX2, "Haswell"),
        ("Nehalem", {"sse4_2", "avx"}, "SandyBridge"),
        ("Haswell", AVX512, "SkylakeX"),
        ("SkylakeX", AVX512, None),  # right already
        ("Zen", AVX2, None),
        ("Haswell", AVX2 - {"fma"}, None),  # AVX2 kernels need FMA as well: nothing better to choose
        ("Prescott", {"sse4_2"}, None),
        ("Prescott", AVX512 - {"avx512vl"}, "Haswell"),  # SkylakeX kernels need all five AVX-512 parts
        ("NeoverseN1", AVX512, None),  # a core we do not know: trusted
    ],
)
def test_the_choice_from_the_cpus_flags(core, flags, wanted):
    assert better_core(core, flags) == wanted


def test_this_cpus_flags_are_read():
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert cpu_level(cpu_flags()) >= 1  # every x86-64 Linux machine we run on has AVX


OPENBLAS = ctypes.util.find_library("openblas")

# OpenBLAS falling back by itself, as on a CPU the build does not know: loaded under OPENBLAS_CORETYPE=Prescott,
# which is then taken away before mlx_vit looks, so that the choice is mlx-vit's to make (a user's own
# OPENBLAS_CORETYPE it leaves alone).
FALLBACK = """
import ctypes, os, sys
ctypes.CDLL({path!r}, mode=ctypes.RTLD_GLOBAL)
if {simulate}:
    del os.environ["OPENBLAS_CORETYPE"]
import mlx_vit
from mlx_vit.blas import blas_info
import mlx.core as mx, numpy as np
info = blas_info()
a, b = np.random.default_rng(0).standard_normal((2, 256, 256)).astype(np.float32)
error = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a.astype(np.float64) @ b).max())
print(info.core, "OPENBLAS_CORETYPE" in os.environ, error < 1e-3, sep="|")
print(info.note)
"""


@pytest.mark.skipif(OPENBLAS is None, reason="no system OpenBLAS")
@pytest.mark.parametrize("simulate", [True, False])
def test_a_generic_fallback_is_switched_and_a_users_choice_kept(simulate):
    flags = cpu_flags()
    if cpu_level(flags) < 2:
        pytest.skip("this CPU has nothing better than the generic kernels")
    code = FALLBACK.format(path=OPENBLAS, simulate=simulate)
    env = {**os.environ, "OPENBLAS_CORETYPE": "Prescott"}
    done = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    first, note = done.stdout.splitlines()
    core, variable_left, correct = first.split("|")
    assert correct == "True"
    if simulate:
        assert core == better_core("Prescott", flags) and variable_left == "False"
        assert note.startswith(f"OpenBLAS chose Prescott for this CPU; mlx-vit chose {core}")
    else:  # the user's OPENBLAS_CORETYPE stays, and --version says what it costs
        assert core == "Prescott" and variable_left == "True"
        assert "looks wrong" in note and "OPENBLAS_CORETYPE is set" in note
