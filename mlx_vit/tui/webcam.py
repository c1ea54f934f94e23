"""Webcam mode as a widget of its own: it opens the frame source, runs one CameraSession at a time on a worker
thread with the Backend it is given, and has the session post its frames to this widget's own message queue,
where a newer frame replaces one not yet handled (messages.CameraFrame.can_replace). The frames then bubble up
to the App, which shows them; the widget itself draws nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual import work
from textual.widget import Widget

from mlx_vit.tui import messages
from mlx_vit.tui.backend import Backend
from mlx_vit.tui.camera_session import CameraSession


class Webcam(Widget):
    """Starts and stops webcam mode; owns the session running now, the count of starts and the frame sources.

    `frame_source` makes an unopened FrameSource from a camera index or a video path (default:
    mlx_vit.camera.FrameSource); `spec` is the source offered until one is started, e.g. "0".
    """

    DEFAULT_CSS = "Webcam { display: none; }"

    def __init__(self, backend: Backend, frame_source: Callable[[int | str], Any] | None = None, *,
                 spec: str = "0", id: str | None = None) -> None:  # fmt: skip
        super().__init__(id=id)
        self._backend = backend
        self._frame_source = frame_source
        self._spec = spec
        self._starts = 0  # sessions started so far: the messages of an older one are stale
        self._session: CameraSession | None = None  # while webcam mode is on
        self._attention = False

    @property
    def running(self) -> bool:
        return self._session is not None

    @property
    def spec(self) -> str:
        """The source last started (or the one given before any start), as typed: "0", "clip.mp4"."""
        return self._spec

    @property
    def source_name(self) -> str:
        """What the running session watches, for the screen ("camera 0", "video clip.mp4"); "" when off."""
        return self._session.name if self._session is not None else ""

    @property
    def attention(self) -> bool:
        """Classify frames through the attention path (with the rollout overlay); the next frame follows."""
        return self._attention

    @attention.setter
    def attention(self, on: bool) -> None:
        self._attention = on
        if self._session is not None:
            self._session.attention = on

    def start(self, spec: str) -> None:
        """Stop any session, open the camera or video file `spec` and classify its newest frames until stopped.

        Raises MlxVitError or OSError when the source cannot be opened; webcam mode is off then.
        """
        self.stop()
        from mlx_vit.camera import FrameSource, source_from_arg

        source = (self._frame_source or FrameSource)(source_from_arg(spec))
        source.open()  # on the UI thread: on macOS OpenCV can only ask for camera permission from the main thread
        self._spec = spec
        self._starts += 1
        self._session = CameraSession(self._starts, spec, source)
        self._session.attention = self._attention
        self._run(self._session)

    def stop(self) -> bool:
        """Leave webcam mode: the session's thread ends after its current frame and closes the source. Returns
        whether webcam mode was on."""
        session, self._session = self._session, None
        if session is None:
            return False
        session.stop.set()
        return True

    def is_current(self, message: messages.CameraFrame | messages.CameraStopped) -> bool:
        """Whether `message` comes from the session running now (not from one stopped since it was posted)."""
        return self._session is not None and message.session == self._session.number

    @work(thread=True, group="camera")
    def _run(self, session: CameraSession) -> None:
        # Posted to this widget, so that frames queue here, apart from the App's other messages, and a newer
        # frame can replace one the UI has not handled yet.
        session.run(self._backend, self.post_message)

    def on_unmount(self) -> None:
        self.stop()
