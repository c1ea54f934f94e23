"""Messages the TUI's workers post back to the UI thread (Textual's post_message is thread-safe).

Each is a dataclass: Textual's Message initialises itself in __post_init__. eq=False keeps them hashable by
identity, as Textual's own messages are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from textual.message import Message

from mlx_vit.tui.backend import Classification, ModelInfo


@dataclass(eq=False)
class ModelLoaded(Message):
    info: ModelInfo


@dataclass(eq=False)
class ModelFailed(Message):
    model: str
    error: str


@dataclass(eq=False)
class ModelProgress(Message):
    """A line mlx-vit logged while loading (download, conversion), shown beside the progress bar."""

    text: str


@dataclass(eq=False)
class ImageOpened(Message):
    path: Path
    image: Image.Image


@dataclass(eq=False)
class ImageFailed(Message):
    path: Path
    error: str


@dataclass(eq=False)
class Classified(Message):
    """A classification of request number `request` (older requests' answers are stale and ignored)."""

    request: int
    result: Classification


@dataclass(eq=False)
class ClassifyFailed(Message):
    request: int
    error: str


@dataclass(eq=False)
class CameraFrame(Message):
    """The newest camera frame, its classification (or the error that stopped it, e.g. no model yet) and the
    classified frames per second. Only the newest one matters: see can_replace."""

    session: int  # which start of webcam mode this frame belongs to
    index: int
    image: Image.Image
    result: Classification | None
    error: str | None
    fps: float | None

    def can_replace(self, message: Message) -> bool:
        # Textual asks the message it is about to handle whether the next one in the queue may take its place:
        # a newer frame does, so a UI slower than the camera shows the newest frame instead of falling behind.
        return isinstance(message, CameraFrame)


@dataclass(eq=False)
class CameraStopped(Message):
    """The camera loop ended by itself (end of a video file, a camera error): `error` says why."""

    session: int
    source: str
    error: str | None
