"""One start of the TUI's webcam mode: its frame source, its stop event, a frames-per-second meter and the loop
that classifies the newest frame, run on a worker thread. The loop only waits on the Backend's futures: MLX work
stays on the backend's own thread. WebcamMode is the App's side of it."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

from PIL import Image
from rich.text import Text
from textual import work

from mlx_vit.errors import MlxVitError, shown
from mlx_vit.tui import messages
from mlx_vit.tui.backend import Backend, Superseded, error_text
from mlx_vit.tui.widgets import seconds_text


class FpsMeter:
    """Frames per second over the last `window` frames."""

    def __init__(self, window: int = 10):
        self.times: deque[float] = deque(maxlen=window)

    def tick(self) -> float | None:
        self.times.append(time.perf_counter())
        first, last = self.times[0], self.times[-1]
        return (len(self.times) - 1) / (last - first) if len(self.times) > 1 and last > first else None


class CameraSession:
    """Webcam mode's `number`-th start, on `source` (an opened FrameSource) named by `spec`.

    `attention` may be switched from the UI thread at any time; the next frame follows it.
    """

    def __init__(self, number: int, spec: str, source: Any):
        self.number = number
        self.spec = spec
        self.source = source
        self.stop = threading.Event()
        self.attention = False

    @property
    def name(self) -> str:
        return f"camera {self.spec}" if self.spec.isdigit() else f"video {shown(Path(self.spec).name)}"

    def run(self, backend: Backend, post: Callable[[Any], Any]) -> None:
        """Read the newest frame, classify it, post it; repeat until stopped or the stream ends. Closes the source."""
        fps = FpsMeter()
        try:
            while not self.stop.is_set():
                try:
                    frame = self.source.read(timeout=0.5)
                except TimeoutError:  # no new frame yet; look at `stop` again
                    continue
                if frame is None:
                    post(messages.CameraStopped(self.number, self.spec, f"{self.spec}: end of stream"))
                    return
                result, error = None, None
                try:
                    result = backend.classify(frame.rgb, attention=self.attention).result()
                except Superseded:
                    continue
                except CancelledError:  # the backend closed: the app is quitting
                    return
                except MlxVitError as failure:  # e.g. no model yet: the frames are still shown
                    error = str(failure)
                overlaid = result is not None and result.overlay is not None
                image = result.overlay if overlaid else Image.fromarray(frame.rgb, "RGB")
                post(messages.CameraFrame(self.number, frame.index, image, result, error, fps.tick()))
        except Exception as failure:  # a camera that fails mid-stream is a notification, not a crash
            post(messages.CameraStopped(self.number, self.spec, error_text(failure)))
        finally:
            self.source.close()


class WebcamMode:
    """The App's webcam mode: start and stop a CameraSession and show its frames. A mixin of MlxVitApp, whose
    widgets (preview, predictions, status), state (current, attention, _request, _camera...) and backend it uses."""

    @property
    def webcam_on(self) -> bool:
        return self._camera is not None

    def start_camera(self, spec: str) -> None:
        """Open the camera or video file `spec` and classify its newest frames until stopped."""
        self.stop_camera()
        from mlx_vit.camera import FrameSource, source_from_arg

        factory = self._frame_source or FrameSource
        try:
            source = factory(source_from_arg(spec))
            # On the main thread: on macOS OpenCV can only ask for camera permission from there.
            source.open()
        except (MlxVitError, OSError) as error:
            self.notify(error_text(error), title="webcam", severity="error", timeout=10)
            return
        self._camera_source = spec
        self._camera_sessions += 1
        camera = self._camera = CameraSession(self._camera_sessions, spec, source)
        camera.attention = self.attention
        self._request += 1  # drop any image classification still on its way
        self.sub_title = f"webcam {shown(spec)}"
        self.preview.set_image(None)
        self.predictions.show_note("waiting for the first frame …")
        self.status.position = camera.name
        self._camera_title()
        self._run_camera(camera)

    def _camera_title(self) -> None:
        attention = " · attention" if self.attention else ""
        self.preview.border_title = Text(f"webcam · {self._camera.name}{attention}")  # Text: names are not markup

    def stop_camera(self) -> None:
        """Leave webcam mode (the camera thread ends after its current frame) and show the current image again."""
        if self._camera is None:
            return
        self._camera.stop.set()
        self._camera = None
        self.preview.border_title = "preview"
        self.preview.set_image(None)
        self.predictions.show_note("choose an image")
        current, self.current = self.current, None
        if current is not None:
            self.show_image(current)
        else:
            self.sub_title = ""
            self._update_position()

    @work(thread=True, group="camera")
    def _run_camera(self, camera: CameraSession) -> None:
        camera.run(self.backend, self.post_message)

    def on_camera_frame(self, message: messages.CameraFrame) -> None:
        if self._camera is None or message.session != self._camera.number:
            return
        self.preview.set_image(message.image)
        status = self.status
        fps = f" · {message.fps:.1f} fps" if message.fps is not None else ""
        status.position = f"{self._camera.name} · frame {message.index}{fps}"
        if message.result is None:
            self.predictions.show_note(message.error or "")
            return
        self.predictions.show(message.result.predictions)
        status.timing = f"inference {seconds_text(message.result.seconds)}"

    def on_camera_stopped(self, message: messages.CameraStopped) -> None:
        if self._camera is None or message.session != self._camera.number:
            return
        self.stop_camera()
        self.notify(message.error or "camera stopped", title="webcam", severity="warning")
