"""A newcomer's first hour (issue 24): a slow BLAS is said once, with its fix, before a run of more than a few images,
and the README's set-up and test commands are the ones CI runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from checkpoints import IMAGES
from typer.testing import CliRunner

from mlx_vit import blas
from mlx_vit.blas import INSTALL_HINT, BlasInfo
from mlx_vit.cli import app
from mlx_vit.runs import FEW_IMAGES

ROOT = Path(__file__).parent.parent
runner = CliRunner()

REFERENCE = BlasInfo("reference (bundled with mlx)", None, f"slow: {INSTALL_HINT}", fix=INSTALL_HINT)
WRONG_CORE = BlasInfo(
    "OpenBLAS 0.3.21",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "core Prescott looks wrong for this AVX-512 CPU (OPENBLAS_CORETYPE is set; SkylakeX would be faster)",
    core="Prescott",
    fix="set OPENBLAS_CORETYPE=SkylakeX, or unset it to let mlx-vit choose",
)
FAST = BlasInfo("OpenBLAS 0.3.21", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "", "SkylakeX")
CHOSEN = BlasInfo("reference (bundled with mlx)", None, "MLX_VIT_BLAS=none")  # the user's own choice: no fix


@pytest.fixture
def blas_is(monkeypatch, tmp_path, vit_folder):
    """Fake this process's BLAS, with nothing warned yet; gives a function that runs a CLI command on N photos."""
    monkeypatch.setattr(blas, "_warned", False)
    monkeypatch.delenv("MLX_VIT_QUIET", raising=False)
    monkeypatch.setenv("MLX_VIT_CACHE", str(tmp_path / "cache"))

    def run(info: BlasInfo, count: int, command: str = "classify"):
        monkeypatch.setattr(blas, "blas_info", lambda: info)
        photos = tmp_path / f"photos-{count}"
        photos.mkdir(exist_ok=True)
        for i in range(count):
            shutil.copy(IMAGES / "chelsea.png", photos / f"{i:02}.png")
        output = tmp_path / f"{command}-{count}-{len(list(tmp_path.iterdir()))}"
        output = output.with_suffix(".npy" if command == "embed" else ".jsonl")
        result = runner.invoke(app, [command, str(photos), "-m", str(vit_folder), "-o", str(output)])
        assert result.exit_code == 0, result.output
        return result.stderr

    return run


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "slow BLAS" in line]


def test_the_reference_blas_is_said_once_with_how_to_install_openblas(blas_is):
    (said,) = warnings(blas_is(REFERENCE, FEW_IMAGES + 1))
    assert said.startswith("mlx-vit: slow BLAS (MLX's bundled reference BLAS")
    assert "apt install libopenblas0-pthread" in said and "pip install mkl" in said and "MLX_VIT_QUIET=1" in said
    assert warnings(blas_is(REFERENCE, FEW_IMAGES + 1)) == []  # once a process


def test_an_openblas_core_below_the_cpus_is_said_with_the_core_to_use(blas_is):
    (said,) = warnings(blas_is(WRONG_CORE, FEW_IMAGES + 1, "embed"))
    assert "core Prescott looks wrong" in said and "set OPENBLAS_CORETYPE=SkylakeX" in said


def test_a_few_images_a_fast_blas_or_the_users_own_choice_say_nothing(blas_is):
    assert warnings(blas_is(REFERENCE, FEW_IMAGES)) == []
    assert warnings(blas_is(FAST, FEW_IMAGES + 1)) == []
    assert warnings(blas_is(CHOSEN, FEW_IMAGES + 1)) == []


def test_mlx_vit_quiet_silences_it(blas_is, monkeypatch):
    monkeypatch.setenv("MLX_VIT_QUIET", "1")
    assert warnings(blas_is(REFERENCE, FEW_IMAGES + 1)) == []
    monkeypatch.setenv("MLX_VIT_QUIET", "0")
    assert len(warnings(blas_is(REFERENCE, FEW_IMAGES + 1))) == 1


def test_this_machines_blas_gets_a_fix_only_when_it_is_slow():
    info = blas.load_blas()
    slow = info.path is None and info.note != "MLX_VIT_BLAS=none" or "looks wrong" in info.note
    assert bool(info.fix) == slow, info
