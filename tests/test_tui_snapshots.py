"""Snapshots (SVG, pytest-textual-snapshot) of the TUI's main screens at 120x40.

Deterministic: a real converted model and real photos, but a clock that always measures 12 ms, the device
reported as "cpu", paths shown relative to the current folder. Update after a deliberate change with
`pytest tests/test_tui_snapshots.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from checkpoints import IMAGES
from textual.widgets import Input
from tui_support import FakeFrameSource, FixedDeviceBackend, RecordingApp, StepTimer, wait_until

from mlx_vit.convert import convert

SIZE = (120, 40)


@pytest.fixture(scope="module")
def mlx_model(vit_folder, tmp_path_factory) -> Path:
    return convert(str(vit_folder), tmp_path_factory.mktemp("tui-snap") / "vit-mlx")


@pytest.fixture
def in_images(monkeypatch):
    monkeypatch.chdir(IMAGES)


def make_app(mlx_model: Path, path: Path, **kwargs) -> RecordingApp:
    backend = FixedDeviceBackend(timer=StepTimer(0.012))
    return RecordingApp(backend, path, str(mlx_model), model_label="test-vit", **kwargs)


def snapshot(snap_compare, app: RecordingApp, ready, press=()) -> bool:
    async def run_before(pilot) -> None:
        await wait_until(pilot, ready)
        await pilot.press(*press)
        for field in app.screen.query(Input):
            field.cursor_blink = False  # a blinking cursor would make the snapshot depend on timing

    try:
        return snap_compare(app, terminal_size=SIZE, run_before=run_before)
    finally:
        app.backend.close()


def test_photo(snap_compare, mlx_model, in_images):
    """A photo, its preview, the top-5 bars and the status line."""
    app = make_app(mlx_model, IMAGES / "chelsea.png")
    assert snapshot(snap_compare, app, lambda: app.predictions.predictions and app.preview.image)
    assert app.notified == []


def test_model_picker(snap_compare, mlx_model, in_images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(mlx_model, cache / "google--vit-base-patch16-224" / ("0123abcd" * 5))
    shutil.copytree(mlx_model, cache / "facebook--deit-tiny-patch16-224" / ("89ef" * 10))
    monkeypatch.setenv("MLX_VIT_CACHE", str(cache))
    app = make_app(mlx_model, IMAGES / "rocket.jpg")
    assert snapshot(snap_compare, app, lambda: app.predictions.predictions, press=["m"])


def test_help(snap_compare, mlx_model, in_images):
    app = make_app(mlx_model, IMAGES)
    assert snapshot(snap_compare, app, lambda: app.model_info, press=["question_mark"])


def test_webcam(snap_compare, mlx_model, in_images):
    """Webcam mode on one frame of a (fake) camera: its preview and predictions, the camera in the status."""

    def frame_source(source):
        return FakeFrameSource(source, [IMAGES / "astronaut.png"], hold=True)

    app = make_app(mlx_model, IMAGES, camera="0", frame_source=frame_source)
    assert snapshot(snap_compare, app, lambda: app.predictions.predictions and app.preview.image)
