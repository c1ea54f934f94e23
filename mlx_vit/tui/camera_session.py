"""One start of the TUI's webcam mode: its frame source, its stop event, a frames-per-second meter and the loop
that classifies the newest frame, run on a worker thread. The loop only waits on the Backend's futures: MLX work
stays on the backend's own thread. webcam.Webcam, the widget of webcam mode, starts and stops sessions."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

from PIL import Image

from mlx_vit.errors import MlxVitError, shown
from mlx_vit.tui import messages
from mlx_vit.tui.backend import Backend, Superseded, error_text


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
