"""Shared fixtures. No test touches the network: the Hub client is forced offline for the whole session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="session")
def deit_folder(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("deit"), kind="deit-teacher", seed=1)


@pytest.fixture
def hf_copy(vit_folder, tmp_path) -> Path:
    """A copy of the session's ViT checkpoint folder, for a test to edit."""
    folder = tmp_path / "model"
    shutil.copytree(vit_folder, folder)
    return folder


@pytest.fixture
def isolated(tmp_path) -> dict:
    """Environment for a CLI subprocess: an empty HF cache and mlx-vit cache, offline."""
    return {"HF_HOME": str(tmp_path / "hf"), "MLX_VIT_CACHE": str(tmp_path / "mlx-vit"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def restored_logging():
    """For tests that invoke the app in-process: its callback points mlx_vit's logger at the runner's stderr,
    closed after each invoke, and sets --debug; both are put back."""
    import logging

    from mlx_vit.cli.errors import state

    logger = logging.getLogger("mlx_vit")
    handlers, level, debug = logger.handlers[:], logger.level, state["debug"]
    yield
    logger.handlers[:], state["debug"] = handlers, debug
    logger.setLevel(level)
