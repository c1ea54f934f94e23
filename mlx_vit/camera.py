"""Frames from a webcam or a video file, for live classification.

OpenCV's `VideoCapture` does the capture (the optional `camera` extra; cv2 is imported only when a source opens).
A camera index, a stream URL and a video file take the same code path, which is how it is tested where no camera
exists. One background thread per source calls `read()` on the capture and hands frames over, converted BGR->RGB:

- live sources (cameras, URLs) keep only the newest frame, so inference never falls behind the camera;
- files with `keep_all=True` deliver every frame in order (exact frame-by-frame output);
- files without it play at their own frame rate and keep only the newest frame, as a camera would.

Only capture runs on that thread: classification (MLX) stays on the caller's thread, and so does opening the
capture, because on macOS OpenCV can only ask for camera permission from the main thread (opencv/opencv#16427).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_vit.errors import CameraError
from mlx_vit.files import exists
from mlx_vit.numbers import parse_int

if TYPE_CHECKING:
    from mlx_vit.classify import Classifier, Prediction

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mlx-vit[camera]'"

# cv2.CAP_PROP_* ids, stable across OpenCV 3-5; spelled out so fake captures work without cv2 installed.
CAP_PROP_POS_MSEC = 0
CAP_PROP_FPS = 5

# How many frames a keep_all source decodes ahead of its consumer.
KEEP_ALL_AHEAD = 4


@dataclass(frozen=True)
class Frame:
    index: int  # 0-based index of the frame in the stream (live sources skip the indices of dropped frames)
    timestamp: float  # seconds: video position for files, time.monotonic() since open for live sources
    rgb: np.ndarray  # (H, W, 3) uint8, RGB order


class FrameTimeout(CameraError, TimeoutError):
    """No frame arrived within the timeout given to FrameSource.read()."""


def is_live(source: int | str | os.PathLike) -> bool:
    """Cameras (an index) and stream URLs are live; anything else is a video file."""
    return isinstance(source, int) or "://" in os.fspath(source)


def source_from_arg(text: str) -> int | str:
    """A command-line `--camera` value: digits are a camera index unless a file of that name exists."""
    if text.isascii() and text.isdigit() and not exists(text):
        return parse_int(text, "--camera", 0)
    return text


class FrameSource:
    """A camera index or a video file path; a background reader keeps only the newest frame.

    Use it as a context manager (or call open() and close()); iterate it, or call read(). read() and iteration
    may run on any one thread; open() should run on the main thread for cameras on macOS.
    """

    def __init__(self, source: int | str | os.PathLike, *, capture_factory: Callable[[Any], Any] | None = None,
                 read_retries: int = 5, keep_all: bool = False, retry_delay: float = 0.1) -> None:  # fmt: skip
        """`capture_factory(source)` returns an object with cv2.VideoCapture's isOpened/read/release/get
        (default: cv2.VideoCapture). After a failed read a live source is retried `read_retries` times,
        `retry_delay` seconds apart, before it is an error; a file that fails to read has ended.
        `keep_all=True` delivers every frame in order instead of only the newest.
        """
        self.source: int | str = source if isinstance(source, int) else os.fspath(source)
        self.live = is_live(self.source)
        self.name = f"camera {self.source}" if isinstance(self.source, int) else self.source
        self.keep_all = keep_all
        self.read_retries = read_retries
        self.retry_delay = retry_delay
        self._factory = capture_factory
        self._capture: Any = None
        self._released = False
        self._release_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Condition()
        # Newest-only sources use a one-slot deque: appending a frame drops the one nobody has read.
        self._frames: collections.deque[Frame] = collections.deque(maxlen=None if keep_all else 1)
        self._ended = False
        self._error: BaseException | None = None
        self._fps = 0.0
        self._opened_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the capture and start the reader; raises CameraError with a one-line, actionable message."""
        if self._capture is not None:
            raise RuntimeError(f"{self.name}: already opened")
        if not self.live and not Path(self.source).is_file():
            raise CameraError(f"{self.name}: no such video file")
        factory = self._factory or _opencv_capture_factory()
        self._capture = factory(self.source)
        try:
            if not self._capture.isOpened():
                raise CameraError(self._open_failure())
            self._fps = float(self._capture.get(CAP_PROP_FPS) or 0.0)
        except BaseException:
            self._release()
            raise
        self._opened_at = time.monotonic()
        self._thread = threading.Thread(target=self._read_loop, name=f"mlx-vit frames: {self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the reader and release the capture exactly once. Idempotent; safe from any thread."""
        self._stop.set()
        with self._ready:
            self._ended = True
            self._frames.clear()
            self._ready.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            # The reader releases the capture when it stops; a capture stuck in read() is left to it.
            self._thread.join(timeout=5)
        if self._thread is None:
            self._release()

    def __enter__(self) -> FrameSource:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def fps(self) -> float:
        """The frame rate the capture reports (0.0 when it doesn't know)."""
        return self._fps

    # -- frames ----------------------------------------------------------------------------------------------

    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame (for newest-only sources, the newest one); None at the end of the stream or after
        close(). Raises CameraError when the capture failed, FrameTimeout when nothing came within `timeout`."""
        if self._capture is None:
            raise RuntimeError(f"{self.name}: call open() first")
        with self._ready:
            if not self._ready.wait_for(lambda: self._frames or self._ended, timeout):
                raise FrameTimeout(f"{self.name}: no frame within {timeout:g} s")
            if self._frames:
                frame = self._frames.popleft()
                self._ready.notify_all()  # a keep_all reader may be waiting for room
                return frame
        if self._error is not None:
            if isinstance(self._error, CameraError):
                raise self._error
            # An exception from the capture itself (cv2.error and the like): one line, cause kept for --debug.
            line = (str(self._error).strip().splitlines() or [type(self._error).__name__])[-1]
            raise CameraError(f"{self.name}: reading failed: {line}") from self._error
        return None

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.read()) is not None:
            yield frame

    # -- the reader thread -----------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        index = 0
        failures = 0
        try:
            while not self._stop.is_set():
                ok, bgr = self._capture.read()
                if not ok or bgr is None:
                    if not self.live:
                        break  # a file that stops reading has ended
                    failures += 1
                    if failures > self.read_retries:
                        raise CameraError(self._read_failure(failures))
                    self._stop.wait(self.retry_delay)
                    continue
                failures = 0
                frame = Frame(index, self._timestamp(index), _to_rgb(bgr, self.name))
                index += 1
                if not self.live and not self.keep_all:
                    # Play a file at its own speed: wait until this frame is due.
                    self._stop.wait(max(0.0, self._opened_at + frame.timestamp - time.monotonic()))
                self._deliver(frame)
        except BaseException as error:  # surfaces in read() on the consumer's thread
            self._error = error
        finally:
            self._release()
            with self._ready:
                self._ended = True
                self._ready.notify_all()

    def _timestamp(self, index: int) -> float:
        if self.live:
            return time.monotonic() - self._opened_at
        msec = float(self._capture.get(CAP_PROP_POS_MSEC))  # position of the frame just decoded
        if msec >= 0 and (msec > 0 or index == 0):
            return msec / 1000
        return index / self._fps if self._fps > 0 else 0.0

    def _deliver(self, frame: Frame) -> None:
        with self._ready:
            if self.keep_all:
                self._ready.wait_for(lambda: len(self._frames) < KEEP_ALL_AHEAD or self._stop.is_set())
            if not self._stop.is_set():
                self._frames.append(frame)
                self._ready.notify_all()

    def _release(self) -> None:
        with self._release_lock:
            if self._capture is None or self._released:
                return
            self._released = True
        try:
            self._capture.release()
        except Exception as error:  # nothing left to do with a capture that fails to close
            log.debug("%s: release failed: %s", self.name, error)

    # -- messages --------------------------------------------------------------------------------------------

    def _open_failure(self) -> str:
        if not isinstance(self.source, int):
            what = "stream" if self.live else "file"
            return f"{self.name}: OpenCV cannot open this {what} (not a video, or a codec it lacks)"
        if sys.platform == "darwin":
            app = _terminal_app()
            status = macos_camera_authorization()
            if status == "not determined":
                return (f"{self.name}: macOS has not allowed camera access yet: allow {app} when macOS asks "
                        "(or in System Settings > Privacy & Security > Camera), then run this again")  # fmt: skip
            if status in ("denied", "restricted"):
                return (f"{self.name}: macOS denies {app} camera access: turn it on in System Settings > "
                        f"Privacy & Security > Camera, then quit and reopen {app}")  # fmt: skip
            hint = "" if status == "authorized" else (
                f"; check that {app} may use it in System Settings > Privacy & Security > Camera"
            )  # fmt: skip
            return f"{self.name}: cannot open it: no camera with this index, or another app is using it{hint}"
        if sys.platform.startswith("linux"):
            return (f"{self.name}: cannot open it: no /dev/video{self.source}, another program is using it, "
                    "or you lack permission (are you in the 'video' group?)")  # fmt: skip
        return f"{self.name}: cannot open it: no camera with this index, or another app is using it"

    def _read_failure(self, failures: int) -> str:
        if not isinstance(self.source, int):
            return f"{self.name}: the stream stopped delivering frames ({failures} failed reads in a row)"
        return (f"{self.name}: opened but delivered no frame in {failures} reads: it may be in use by another "
                "app, disconnected, or (on macOS) not permitted")  # fmt: skip


def _opencv_capture_factory() -> Callable[[Any], Any]:
    # OpenCV logs a WARN line per backend it tries; mlx-vit says what failed in one line of its own.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        import cv2
    except ImportError as error:
        raise CameraError(f"OpenCV is needed for --camera and video files: {INSTALL_HINT} ({error})") from None
    return cv2.VideoCapture


def _to_rgb(bgr: np.ndarray, name: str) -> np.ndarray:
    """An OpenCV frame (BGR, BGRA or grayscale, uint8) -> a new (H, W, 3) uint8 RGB array."""
    if bgr.dtype != np.uint8 or bgr.ndim not in (2, 3) or (bgr.ndim == 3 and bgr.shape[2] not in (1, 3, 4)):
        raise CameraError(f"{name}: unsupported frame of shape {bgr.shape} and dtype {bgr.dtype}")
    if bgr.ndim == 2 or bgr.shape[2] == 1:
        return np.repeat(bgr.reshape(*bgr.shape[:2], 1), 3, axis=2)
    return np.ascontiguousarray(bgr[..., 2::-1])  # BGR(A) -> RGB, alpha dropped


def _terminal_app() -> str:
    program = os.environ.get("TERM_PROGRAM", "")
    return {"Apple_Terminal": "Terminal", "iTerm.app": "iTerm", "vscode": "Visual Studio Code"}.get(
        program, program or "your terminal app"
    )


def macos_camera_authorization() -> str | None:
    """AVFoundation's camera permission for this process ('authorized', 'denied', 'restricted',
    'not determined'), or None off macOS or when it can't be asked. Asking never shows a prompt."""
    if sys.platform != "darwin":
        return None
    import ctypes
    import ctypes.util

    try:
        objc = ctypes.CDLL(ctypes.util.find_library("objc"))
        avfoundation = ctypes.CDLL("/System/Library/Frameworks/AVFoundation.framework/AVFoundation")
        objc.objc_getClass.restype = objc.sel_registerName.restype = ctypes.c_void_p
        objc.objc_getClass.argtypes = objc.sel_registerName.argtypes = [ctypes.c_char_p]
        # objc_msgSend must be called through a prototype of the exact method signature (arm64 ABI).
        send = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
            ("objc_msgSend", objc)
        )
        status = send(
            objc.objc_getClass(b"AVCaptureDevice"),
            objc.sel_registerName(b"authorizationStatusForMediaType:"),
            ctypes.c_void_p.in_dll(avfoundation, "AVMediaTypeVideo"),
        )
    except (OSError, AttributeError, ValueError, TypeError) as error:
        log.debug("camera authorization status unavailable: %s", error)
        return None
    return {0: "not determined", 1: "restricted", 2: "denied", 3: "authorized"}.get(status)


# -- classification ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FramePredictions:
    frame: Frame
    predictions: list[Prediction]
    latency_ms: float  # preprocessing + forward pass + top-k of this frame


def classify_frames(classifier: Classifier, frames: Iterable[Frame], top_k: int = 5,
                    fps: float | None = None) -> Iterator[FramePredictions]:  # fmt: skip
    """Classify frames in order on the calling thread (MLX work stays there). With `fps`, classify at most
    that many frames per second of stream time (Frame.timestamp) and skip the rest."""
    from PIL import Image

    period = 1 / fps if fps else 0.0
    due: float | None = None
    for frame in frames:
        if due is not None and frame.timestamp < due - period / 4:  # a quarter period absorbs camera jitter
            continue
        if period:
            # Keep to the schedule while frames come on time; restart it after a gap longer than a period.
            due = due + period if due is not None and frame.timestamp - due < period else frame.timestamp + period
        start = time.perf_counter()
        predictions = classifier.classify([Image.fromarray(frame.rgb)], top_k)[0]
        yield FramePredictions(frame, predictions, (time.perf_counter() - start) * 1000)
