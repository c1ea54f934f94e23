"""Helpers for the TUI tests: run an app headless, wait for it, a reference classifier, a fake camera."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_vit.classify import Prediction, load
from mlx_vit.errors import CameraError
from mlx_vit.images import open_image
from mlx_vit.tui.app import MlxVitApp
from mlx_vit.tui.backend import Backend

SIZE = (120, 40)


def run_app(app: RecordingApp, scenario: Callable[..., Awaitable[None]], size: tuple[int, int] = SIZE) -> None:
    """Run `scenario(pilot)` against `app` in a headless terminal, then close the app's backend."""

    async def main() -> None:
        async with app.run_test(size=size, notifications=True) as pilot:
            await scenario(pilot)

    try:
        asyncio.run(main())
    finally:
        app.backend.close()


async def wait_until(pilot, condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Let the app run until `condition()` holds (the backend thread answers asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition.__doc__ or condition}")
        await pilot.pause(0.05)


@cache
def _classifier(folder: str):
    return load(folder)  # on the test's main thread, which outlives every MLX call


def reference(folder: Path, image: Path | Image.Image, top_k: int = 5) -> list[Prediction]:
    """What mlx_vit.classify computes for `image` with the model in `folder` (parity with transformers is
    tested in test_model/test_cli)."""
    return _classifier(str(folder)).classify([image], top_k=top_k)[0]


def same_predictions(shown: list[Prediction], expected: list[Prediction]) -> bool:
    return [(p.label, p.class_id) for p in shown] == [(p.label, p.class_id) for p in expected] and all(
        abs(a.score - b.score) <= 1e-6 for a, b in zip(shown, expected, strict=True)
    )


def assert_same_predictions(shown: list[Prediction], expected: list[Prediction]) -> None:
    assert [p.label for p in shown] == [p.label for p in expected]
    assert [p.class_id for p in shown] == [p.class_id for p in expected]
    np.testing.assert_allclose([p.score for p in shown], [p.score for p in expected], atol=1e-6)


class RecordingApp(MlxVitApp):
    """The app, keeping (severity, message) of every notification it shows, oldest first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.notified: list[tuple[str, str]] = []

    def notify(self, message: str, *, severity: str = "information", **kwargs) -> None:
        self.notified.append((severity, message))
        super().notify(message, severity=severity, **kwargs)


class StepTimer:
    """A clock that advances by `step` seconds each time it is read: inference times that never change."""

    def __init__(self, step: float = 0.012) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class FixedDeviceBackend(Backend):
    """The real backend, reporting the device as 'cpu' so snapshots match on Metal machines too."""

    def device(self) -> str:
        return "cpu"


@dataclass(frozen=True)
class Frame:  # the same fields as mlx_vit.camera.Frame
    index: int
    timestamp: float
    rgb: np.ndarray


class FakeFrameSource:
    """Stands in for mlx_vit.camera.FrameSource where there is no camera: real photos as frames, then the end
    of the stream. `hold` keeps the last frame coming until released, like a live camera."""

    instances: list[FakeFrameSource] = []

    def __init__(self, source: int | str | os.PathLike, photos: Iterable[Path] = (), *, hold: bool = False,
                 fail_open: str | None = None) -> None:  # fmt: skip
        self.source = source
        self.frames = [np.asarray(open_image(p)) for p in photos]
        self.hold = hold
        self.fail_open = fail_open
        self.opened = self.closed = False
        self.delivered = 0
        self.release = threading.Event()
        FakeFrameSource.instances.append(self)

    def open(self) -> None:
        if self.fail_open:
            raise CameraError(self.fail_open)
        self.opened = True

    def read(self, timeout: float | None = None) -> Frame | None:
        assert self.opened and not self.closed
        if self.delivered < len(self.frames):
            self.delivered += 1
            return Frame(self.delivered - 1, self.delivered / 10, self.frames[self.delivered - 1])
        if self.hold and not self.release.wait(timeout):
            raise TimeoutError("no frame yet")  # what FrameSource.read raises (FrameTimeout) after `timeout`
        return None

    def close(self) -> None:
        self.closed = True
        self.release.set()
