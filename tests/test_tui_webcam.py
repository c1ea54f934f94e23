"""The TUI's webcam mode (the Webcam widget) on real video files that OpenCV writes and decodes: the same code path
as a camera (mlx_vit.camera.FrameSource), so nothing here is faked. Frames bubble from the widget to the App."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoints import IMAGES, PHOTOS
from tui_support import RecordingApp, assert_same_predictions, reference, run_app, same_predictions, wait_until

from mlx_vit.camera import FrameSource
from mlx_vit.convert import convert
from mlx_vit.images import open_image
from mlx_vit.tui import messages
from mlx_vit.tui.backend import Backend

cv2 = pytest.importorskip("cv2", reason="the camera extra (opencv-python-headless) is not installed")

SIZE = (64, 48)  # width, height of the videos' frames


@pytest.fixture(scope="module")
def mlx_model(vit_folder, tmp_path_factory) -> Path:
    return convert(str(vit_folder), tmp_path_factory.mktemp("tui-webcam") / "vit-mlx")


def write_video(path: Path, fps: float, frames: int) -> Path:
    """An MJPG .avi of the test photos in turn, one a frame."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, SIZE)
    for i in range(frames):
        writer.write(np.ascontiguousarray(np.asarray(open_image(PHOTOS[i % len(PHOTOS)]).resize(SIZE))[..., ::-1]))
    writer.release()
    return path


def last_frame(video: Path) -> np.ndarray:
    """The last frame of `video` as OpenCV decodes it, in RGB: the reference pixels."""
    capture = cv2.VideoCapture(str(video))
    frame = None
    while (read := capture.read())[0]:
        frame = read[1]
    capture.release()
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def real_sources(captures: list):
    """A frame_source that opens real FrameSources (playing a file at its own speed, newest frame only, as a
    camera) and keeps their OpenCV captures in `captures`."""

    def capture(source):
        captures.append(cv2.VideoCapture(source))
        return captures[-1]

    return lambda source: FrameSource(source, capture_factory=capture)


def reader_alive(video: Path) -> bool:
    return any(thread.name == f"mlx-vit frames: {video}" for thread in threading.enumerate())


def showing(app, model: Path, image: Path):
    """A condition: the app shows what `model` computes for `image`."""
    expected = reference(model, image)
    return lambda: same_predictions(app.predictions.shown(), expected)


class FrameApp(RecordingApp):
    """The app, keeping every camera frame that reaches its handler, oldest first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frames: list[messages.CameraFrame] = []

    def on_camera_frame(self, message: messages.CameraFrame) -> None:  # then MlxVitApp's own handler runs
        self.frames.append(message)


class GatedSource(FrameSource):
    """A real FrameSource whose first read waits for `gate`, that counts the frames read from it and says when it
    is closed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reading, self.gate, self.closed = threading.Event(), threading.Event(), threading.Event()
        self.read_frames = 0

    def read(self, timeout: float | None = None):
        self.reading.set()
        self.gate.wait()
        frame = super().read(timeout)
        self.read_frames += frame is not None
        return frame

    def close(self) -> None:
        super().close()
        self.closed.set()


def test_a_burst_of_frames_ends_with_only_the_newest_handled(mlx_model, tmp_path):
    """Frames posted while the UI is busy queue at the Webcam widget, where each newer one replaces the one not
    yet handled: of a whole video classified meanwhile, the App gets only its last frame, then its end."""
    video = write_video(tmp_path / "burst.avi", 10, 24)
    sources: list[GatedSource] = []

    def frame_source(source):
        sources.append(GatedSource(source, keep_all=True))  # every frame, as fast as it is decoded
        return sources[-1]

    app = FrameApp(Backend(), IMAGES, str(mlx_model), frame_source=frame_source)

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.model_info)
        app.start_camera(str(video))
        assert app.webcam_on
        await wait_until(pilot, sources[0].reading.is_set)  # the session's thread is at its first read
        # Block the UI thread until the session has classified and posted every frame and the end of the video.
        sources[0].gate.set()
        assert sources[0].closed.wait(60)
        assert sources[0].read_frames == 24
        await wait_until(pilot, lambda: app.notified)

    run_app(app, scenario)
    assert [frame.index for frame in app.frames] == [23]
    last = app.frames[0]
    assert np.array_equal(np.asarray(last.image), last_frame(video))
    assert_same_predictions(last.result.predictions[:5], reference(mlx_model, last.image))
    assert app.notified == [("warning", f"{video}: end of stream")]  # the end is never replaced by a frame
    assert not app.webcam_on


def test_leaving_webcam_mode_stops_and_releases_its_source(mlx_model, tmp_path):
    """w in webcam mode: the session's thread ends, the video's reader stops and its capture is released, the
    photo is back; a frame still on its way from the session is not shown over it."""
    video = write_video(tmp_path / "clip.avi", 5, 40)  # 8 s: still playing when w is pressed
    photo = IMAGES / "horse.png"
    captures: list = []
    app = FrameApp(Backend(), photo, str(mlx_model), frame_source=real_sources(captures))

    async def scenario(pilot):
        await wait_until(pilot, showing(app, mlx_model, photo))
        app.start_camera(str(video))
        await wait_until(pilot, lambda: app.frames and app.frames[-1].result is not None)
        assert app.status.position.startswith("video clip.avi · frame ")
        await pilot.press("w")
        assert not app.webcam_on
        await wait_until(pilot, lambda: not captures[0].isOpened() and not reader_alive(video), timeout=10)
        assert not [worker for worker in app.workers if worker.group == "camera" and not worker.is_finished]
        await wait_until(pilot, showing(app, mlx_model, photo))
        shown = app.preview.image
        late = app.frames[-1]
        app.webcam.post_message(messages.CameraFrame(late.session, late.index + 1, late.image, late.result, None, 1))
        await pilot.pause(0.2)
        assert app.preview.image is shown and "frame" not in app.status.position

    run_app(app, scenario)
    assert len(captures) == 1 and app.notified == []


def test_quitting_in_webcam_mode_releases_the_source(mlx_model, tmp_path):
    """The app quits with webcam mode on: the session stops then, not at the end of the video (or never, for a
    camera), and releases the capture."""
    video = write_video(tmp_path / "clip.avi", 5, 40)  # 8 s
    captures: list = []
    app = FrameApp(Backend(), IMAGES, str(mlx_model), camera=str(video), frame_source=real_sources(captures))
    quit_at = []

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.frames)  # well before the video's end
        quit_at.append(time.monotonic())

    run_app(app, scenario)
    while (captures[0].isOpened() or reader_alive(video)) and time.monotonic() < quit_at[0] + 15:
        time.sleep(0.05)
    assert time.monotonic() - quit_at[0] < 3, "the capture was released at the end of the video, not at the quit"
