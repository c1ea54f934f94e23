"""Messages the TUI's workers post back to the UI thread (Textual's post_message is thread-safe)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from textual.message import Message

from mlx_vit.tui.backend import Classification, ModelInfo


class ModelLoaded(Message):
    def __init__(self, info: ModelInfo) -> None:
        super().__init__()
        self.info = info


class ModelFailed(Message):
    def __init__(self, model: str, error: str) -> None:
        super().__init__()
        self.model = model
        self.error = error


class ModelProgress(Message):
    """A line mlx-vit logged while loading (download, conversion), shown beside the progress bar."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ImageOpened(Message):
    def __init__(self, path: Path, image: Image.Image) -> None:
        super().__init__()
        self.path = path
        self.image = image


class ImageFailed(Message):
    def __init__(self, path: Path, error: str) -> None:
        super().__init__()
        self.path = path
        self.error = error


class Classified(Message):
    """A classification of request number `request` (older requests' answers are stale and ignored)."""

    def __init__(self, request: int, result: Classification) -> None:
        super().__init__()
        self.request = request
        self.result = result


class ClassifyFailed(Message):
    def __init__(self, request: int, error: str) -> None:
        super().__init__()
        self.request = request
        self.error = error


class CameraFrame(Message):
    """The newest camera frame, its classification (or the error that stopped it, e.g. no model yet) and the
    classified frames per second."""

    def __init__(self, session: int, index: int, image: Image.Image, result: Classification | None,
                 error: str | None, fps: float | None) -> None:  # fmt: skip
        super().__init__()
        self.session = session  # which start of webcam mode this frame belongs to
        self.index = index
        self.image = image
        self.result = result
        self.error = error
        self.fps = fps


class CameraStopped(Message):
    """The camera loop ended by itself (end of a video file, a camera error): `error` says why."""

    def __init__(self, session: int, source: str, error: str | None) -> None:
        super().__init__()
        self.session = session
        self.source = source
        self.error = error
