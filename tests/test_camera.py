"""Frame sources and `mlx-vit classify --camera`: real video files written with OpenCV stand in for a camera
(the same code path); fake captures stand in for the camera failures no test machine can produce."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoints import PHOTOS, make_checkpoint, run_cli
from PIL import Image

from mlx_vit import camera as camera_module
from mlx_vit.camera import CAP_PROP_FPS, Frame, FrameSource, FrameTimeout, source_from_arg
from mlx_vit.classify import load
from mlx_vit.errors import CameraError

cv2 = pytest.importorskip("cv2", reason="the camera extra (opencv-python-headless) is not installed")

FPS = 10
FRAMES = 30
SIZE = (96, 72)  # width, height
TOLERANCE = 1e-5


def write_clip(path: Path, fps: float) -> Path:
    """An MJPG .avi of crops from the real photos, a different crop and photo in every frame."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, SIZE)
    assert writer.isOpened()
    for i in range(FRAMES):
        photo = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        side = min(photo.size) // 2
        x, y = (i * 37) % (photo.width - side), (i * 23) % (photo.height - side)
        rgb = np.asarray(photo.crop((x, y, x + side, y + side)).resize(SIZE))
        writer.write(np.ascontiguousarray(rgb[..., ::-1]))
    writer.release()
    return path


def decode(path: Path) -> list[np.ndarray]:
    """Every frame of a video as OpenCV decodes it, converted BGR -> RGB: the reference pixels."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.avi", FPS)


@pytest.fixture(scope="module")
def decoded(clip) -> list[np.ndarray]:
    frames = decode(clip)
    assert len(frames) == FRAMES
    return frames


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # A larger init than the shared fixture's, so that these small frames get clearly different predictions.
    return make_checkpoint(tmp_path_factory.mktemp("vit-camera"), initializer_range=0.5)


@pytest.fixture(scope="module")
def classifier(model):
    return load(str(model))


def env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "MLX_VIT_CACHE": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}  # fmt: skip


def run(*args, tmp_path: Path) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env(tmp_path))


def assert_same(predictions: list[dict], reference) -> None:
    assert [p["label"] for p in predictions] == [p.label for p in reference]
    assert [p["class_id"] for p in predictions] == [p.class_id for p in reference]
    assert np.abs(np.array([p["score"] for p in predictions]) - [p.score for p in reference]).max() < TOLERANCE


class Spy:
    """A real cv2.VideoCapture that counts release() calls."""

    def __init__(self, source):
        self.capture = cv2.VideoCapture(source)
        self.releases = 0

    def __getattr__(self, name):
        return getattr(self.capture, name)

    def release(self):
        self.releases += 1
        self.capture.release()


def spying(spies: list):
    def factory(source):
        spies.append(Spy(source))
        return spies[-1]

    return factory


# -- the CLI on a real video file ------------------------------------------------------------------------------


def test_cli_jsonl_equals_classifying_the_frames_as_images(clip, decoded, model, classifier, tmp_path):
    done = run("classify", "--camera", clip, "--frames", 10, "--format", "jsonl", "-m", model, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["frame"] for line in lines] == list(range(10))
    assert [line["timestamp"] for line in lines] == pytest.approx([i / FPS for i in range(10)], abs=1e-6)
    for line in lines:
        reference = classifier.classify([Image.fromarray(decoded[line["frame"]])], top_k=5)[0]
        assert_same(line["predictions"], reference)
        assert line["latency_ms"] > 0
    assert len({line["predictions"][0]["label"] for line in lines}) >= 3  # the frames really differ
    assert "clip.avi: 10 frames classified" in done.stderr and "stopped by --frames 10" in done.stderr


def test_cli_reads_a_file_to_its_end_at_the_fps_asked(clip, decoded, model, classifier, tmp_path):
    done = run("classify", "--camera", clip, "--fps", 4, "--format", "jsonl", "-k", 3, "-m", model, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    times = np.array([line["timestamp"] for line in lines])
    # 4 frames in each second of the 3 s clip, evenly enough: never two within 0.2 s (a 10 fps frame grid).
    assert [int(((times >= s) & (times < s + 1)).sum()) for s in range(3)] == [4, 4, 4]
    assert np.diff(times).min() >= 0.2 - 1e-6
    for line in lines:
        assert_same(line["predictions"], classifier.classify([Image.fromarray(decoded[line["frame"]])], 3)[0])
    assert "12 frames classified" in done.stderr and "stopped by end of stream" in done.stderr


def test_cli_live_table(clip, decoded, model, classifier, tmp_path):
    done = run("classify", "--camera", clip, "--frames", 3, "-k", 2, "-m", model, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    top = classifier.classify([Image.fromarray(decoded[2])], top_k=2)[0]  # the table shows the last frame
    for p in top:
        assert p.label in done.stdout and f"{p.score:.4f}" in done.stdout
    assert "frame 2 at 0.20 s" in done.stdout and "fps" in done.stdout and "latency" in done.stdout


@pytest.mark.parametrize(
    "source, message",
    [
        ("missing.avi", "error: missing.avi: no such video file"),
        ("notes.avi", "error: notes.avi: OpenCV cannot open this file"),
        ("7", "error: camera 7: cannot open it"),  # real OpenCV, and no camera on a test machine
    ],
)
def test_cli_sources_that_fail_to_open_are_one_line(source, message, model, tmp_path):
    (tmp_path / "notes.avi").write_text("not a video")
    done = run_cli("classify", "--camera", source, "-m", model, env=env(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["classify", "--camera", "a.avi", "b.avi"],
        ["classify", "--camera", "--format", "json"],
        ["classify", "x.png", "--frames", "3"],
        ["classify", "--camera", "--frames", "0"],
        ["classify"],
    ],
)
def test_cli_usage_errors_exit_2(args, tmp_path):
    assert run(*args, tmp_path=tmp_path).returncode == 2


# A real `mlx-vit` process whose camera is a fake: ENDLESS delivers frames until released, BROKEN opens and
# then never delivers one. Each release() is printed, so the test sees it happen exactly once.
FAKE_CAMERA_MAIN = """
import os, sys, time
import numpy as np
from mlx_vit import camera, cli

class FakeCamera:
    def __init__(self, source):
        self.rng, self.releases = np.random.default_rng(0), 0
    def isOpened(self):
        return True
    def get(self, prop):
        return 30.0 if prop == camera.CAP_PROP_FPS else 0.0
    def read(self):
        time.sleep(0.005)
        if os.environ["FAKE_CAMERA"] == "BROKEN":
            return False, None
        return True, self.rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    def release(self):
        self.releases += 1
        print(f"released {self.releases}", file=sys.stderr, flush=True)

camera._opencv_capture_factory = lambda: FakeCamera
sys.argv[0] = "mlx-vit"
cli.main()
"""


def fake_camera_process(kind: str, model: Path, tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "fake_camera_main.py"
    script.write_text(FAKE_CAMERA_MAIN)
    return subprocess.Popen([sys.executable, script, "classify", "--camera", "--format", "jsonl", "-m", model],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env(tmp_path), "FAKE_CAMERA": kind})  # fmt: skip


def test_cli_ctrl_c_stops_cleanly_with_a_summary(model, tmp_path):
    process = fake_camera_process("ENDLESS", model, tmp_path)
    lines = [process.stdout.readline() for _ in range(3)]
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    lines += rest.splitlines()
    frames = [json.loads(line)["frame"] for line in lines]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)
    assert f"camera 0: {len(frames)} frames classified" in stderr and "stopped by Ctrl-C" in stderr
    assert stderr.count("released") == 1 and "released 1" in stderr and "Traceback" not in stderr


def test_cli_camera_that_delivers_nothing_is_one_error_line(model, tmp_path):
    process = fake_camera_process("BROKEN", model, tmp_path)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and stdout == ""
    errors = [line for line in stderr.splitlines() if not line.startswith("released")]
    assert errors == ["error: camera 0: opened but delivered no frame in 6 reads: it may be in use by another app, "
                      "disconnected, or (on macOS) not permitted"]  # fmt: skip
    assert stderr.count("released") == 1


# -- FrameSource on real files ---------------------------------------------------------------------------------


def test_every_frame_of_a_file_in_order(clip, decoded):
    spies = []
    with FrameSource(clip, capture_factory=spying(spies), keep_all=True) as source:
        frames = list(source)
        assert source.fps == FPS
    assert [f.index for f in frames] == list(range(FRAMES))
    assert [f.timestamp for f in frames] == pytest.approx([i / FPS for i in range(FRAMES)], abs=1e-6)
    for frame, reference in zip(frames, decoded, strict=True):
        assert frame.rgb.dtype == np.uint8 and frame.rgb.flags.c_contiguous
        np.testing.assert_array_equal(frame.rgb, reference)
    assert spies[0].releases == 1


def test_a_file_plays_at_its_speed_and_a_slow_reader_gets_the_newest_frames(tmp_path, decoded):
    fast = write_clip(tmp_path / "fast.avi", 100)  # 30 frames in 0.3 s
    spies = []
    start = time.monotonic()
    with FrameSource(fast, capture_factory=spying(spies)) as source:
        frames = []
        while (frame := source.read(timeout=10)) is not None:
            frames.append(frame)
            time.sleep(0.05)  # a consumer five times slower than the video
    assert time.monotonic() - start >= 0.29  # the last frame is due at 0.29 s
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)) and len(indices) < FRAMES and indices[-1] == FRAMES - 1
    for frame in frames:
        assert frame.timestamp == pytest.approx(frame.index / 100, abs=1e-6)
        np.testing.assert_array_equal(frame.rgb, decoded[frame.index])  # same photo crops as the 10 fps clip
    assert spies[0].releases == 1


def test_a_stream_url_is_live_like_a_camera(clip, decoded):
    with FrameSource(clip.as_uri(), read_retries=2, retry_delay=0) as source:  # file:///...: FFmpeg's URL reader
        assert source.live
        frames = []
        with pytest.raises(CameraError, match=r"clip.avi: the stream stopped delivering frames \(3 failed reads"):
            while frame := source.read(timeout=10):
                frames.append(frame)
    assert frames and [f.index for f in frames] == sorted({f.index for f in frames})
    for frame in frames:
        np.testing.assert_array_equal(frame.rgb, decoded[frame.index])
    assert [f.timestamp for f in frames] == sorted(f.timestamp for f in frames)  # seconds since open, not positions


def test_a_file_that_is_not_a_video(tmp_path):
    notes = tmp_path / "notes.avi"
    notes.write_text("not a video")
    spies = []
    with pytest.raises(CameraError, match=r"notes.avi: OpenCV cannot open this file"):
        FrameSource(notes, capture_factory=spying(spies)).open()
    assert spies[0].releases == 1


def test_a_missing_file_never_reaches_opencv(tmp_path):
    def factory(source):
        raise AssertionError("opened")

    with pytest.raises(CameraError, match=r"missing.avi: no such video file"):
        FrameSource(tmp_path / "missing.avi", capture_factory=factory).open()


def test_without_opencv_the_error_says_what_to_install(monkeypatch, clip):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(CameraError, match=r"pip install 'mlx-vit\[camera\]'"):
        FrameSource(clip).open()


def test_source_from_arg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "3").write_bytes(b"")
    assert [source_from_arg(s) for s in ["0", "12", "3", "clip.avi"]] == [0, 12, "3", "clip.avi"]


# -- failure modes with fake captures ---------------------------------------------------------------------------


class FakeCapture:
    """cv2.VideoCapture's surface. `reads` is a script, one item per read(): a frame, None (a failed read) or an
    exception to raise; after it, `then` is returned forever ("frames": fresh frames, like a camera)."""

    def __init__(self, reads=(), then=None, opened=True, delay=0.0):
        self.reads, self.then, self.opened, self.delay = list(reads), then, opened, delay
        self.read_calls = 0
        self.releases = 0
        self.sources = []

    def __call__(self, source):  # the capture factory
        self.sources.append(source)
        return self

    def isOpened(self):
        return self.opened

    def get(self, prop):
        return 30.0 if prop == CAP_PROP_FPS else 0.0

    def read(self):
        self.read_calls += 1
        time.sleep(self.delay)
        item = self.reads.pop(0) if self.reads else self.then
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, str):
            item = np.full((4, 6, 3), self.read_calls % 256, np.uint8)
        return (item is not None), item

    def release(self):
        self.releases += 1


def bgr(value: int) -> np.ndarray:
    return np.full((4, 6, 3), value, np.uint8)


@pytest.mark.parametrize(
    "platform, authorization, expected, unexpected",
    [
        ("linux", None, "camera 0: cannot open it: no /dev/video0, another program is using it, or you lack "
         "permission (are you in the 'video' group?)", None),
        ("darwin", "denied", "camera 0: macOS denies iTerm camera access: turn it on in System Settings > Privacy & "
         "Security > Camera, then quit and reopen iTerm", None),
        ("darwin", "restricted", "macOS denies iTerm camera access", None),
        ("darwin", "not determined", "camera 0: macOS has not allowed camera access yet: allow iTerm when macOS asks",
         None),
        ("darwin", "authorized", "camera 0: cannot open it: no camera with this index, or another app is using it",
         "Privacy"),
        ("darwin", None, "another app is using it; check that iTerm may use it in System Settings > Privacy & "
         "Security > Camera", None),
    ],
)  # fmt: skip
def test_a_camera_that_cannot_open(platform, authorization, expected, unexpected, monkeypatch):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(camera_module, "macos_camera_authorization", lambda: authorization)
    monkeypatch.setenv("TERM_PROGRAM", "iTerm.app")
    fake = FakeCapture(opened=False)
    with pytest.raises(CameraError) as caught:
        FrameSource(0, capture_factory=fake).open()
    message = str(caught.value)
    assert expected in message and "\n" not in message
    assert unexpected is None or unexpected not in message
    assert fake.sources == [0] and fake.releases == 1 and fake.read_calls == 0


def test_macos_authorization_is_not_asked_elsewhere(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert camera_module.macos_camera_authorization() is None


def test_a_camera_that_never_delivers_a_frame_fails_after_its_retries():
    fake = FakeCapture(then=None)
    with FrameSource(0, capture_factory=fake, read_retries=3, retry_delay=0) as source:
        with pytest.raises(CameraError, match=r"camera 0: opened but delivered no frame in 4 reads"):
            source.read(timeout=10)
    assert fake.read_calls == 4 and fake.releases == 1


def test_failed_reads_are_retried_and_the_count_starts_again_after_a_frame():
    fake = FakeCapture(reads=[None, None, bgr(1), None, None, bgr(2)], then=None)
    with FrameSource(0, capture_factory=fake, read_retries=2, retry_delay=0, keep_all=True) as source:
        first, second = source.read(timeout=10), source.read(timeout=10)
        with pytest.raises(CameraError, match="delivered no frame in 3 reads"):
            source.read(timeout=10)
    assert (first.index, second.index) == (0, 1)
    assert first.rgb[0, 0].tolist() == [1, 1, 1] and second.rgb[0, 0].tolist() == [2, 2, 2]
    assert fake.read_calls == 6 + 3 and fake.releases == 1


def test_a_failed_read_ends_a_file_without_retries(clip):
    fake = FakeCapture(reads=[bgr(1), bgr(2)], then=None)
    with FrameSource(clip, capture_factory=fake, keep_all=True) as source:
        assert [f.rgb[0, 0, 0] for f in source] == [1, 2]
        assert source.read() is None
    assert fake.sources == [str(clip)] and fake.read_calls == 3 and fake.releases == 1


def test_an_exception_in_the_capture_reaches_the_reader_as_one_line():
    error = RuntimeError("OpenCV(5.0.0) cap.cpp:42: error: (-215:Assertion failed) !frame.empty()")
    fake = FakeCapture(reads=[bgr(1), error])
    with FrameSource(0, capture_factory=fake, keep_all=True) as source:
        assert source.read(timeout=10).index == 0
        with pytest.raises(CameraError, match=r"reading failed: OpenCV\(5.0.0\) .*!frame.empty\(\)") as caught:
            source.read(timeout=10)
    assert caught.value.__cause__ is error and fake.releases == 1


@pytest.mark.parametrize("interruption", [ValueError("a bug in the loop"), KeyboardInterrupt()])
def test_released_exactly_once_when_the_consumer_stops_with_an_exception(interruption):
    fake = FakeCapture(then="frames", delay=0.001)
    source = FrameSource(0, capture_factory=fake)
    with pytest.raises(type(interruption)):
        with source:
            for frame in source:
                if frame.index >= 3:
                    raise interruption
    assert fake.releases == 1 and not source._thread.is_alive()
    source.close()
    assert fake.releases == 1
    assert source.read() is None  # closed: the stream has ended


def test_close_without_open_touches_nothing():
    fake = FakeCapture()
    FrameSource(0, capture_factory=fake).close()
    assert fake.sources == [] and fake.releases == 0


def test_read_times_out_when_no_frame_comes():
    fake = FakeCapture(then="frames", delay=0.5)
    with FrameSource(0, capture_factory=fake) as source:
        with pytest.raises(FrameTimeout, match=r"camera 0: no frame within 0.05 s") as caught:
            source.read(timeout=0.05)
        assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, CameraError)
        assert isinstance(source.read(timeout=10), Frame)
    assert fake.releases == 1


def test_frames_are_converted_to_rgb():
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6)
    bgra = np.stack([gray, gray + 100, gray + 200, np.full_like(gray, 7)], axis=2)
    fake = FakeCapture(reads=[gray, gray[..., None], bgra, bgra[..., :3]])
    with FrameSource(0, capture_factory=fake, keep_all=True) as source:
        frames = [source.read(timeout=10) for _ in range(4)]
    expected_gray = np.stack([gray] * 3, axis=2)
    expected_color = np.stack([gray + 200, gray + 100, gray], axis=2)
    for frame, expected in zip(frames, [expected_gray, expected_gray, expected_color, expected_color], strict=True):
        np.testing.assert_array_equal(frame.rgb, expected)


def test_unsupported_frames_are_an_error():
    fake = FakeCapture(reads=[np.zeros((4, 6, 3), np.float32)])
    with FrameSource(0, capture_factory=fake) as source:
        with pytest.raises(CameraError, match=r"camera 0: unsupported frame of shape \(4, 6, 3\) and dtype float32"):
            source.read(timeout=10)
    assert fake.releases == 1


def test_the_reader_is_a_background_thread_and_classification_stays_on_the_caller(clip, classifier):
    readers = []

    def factory(source):
        capture = Spy(source)
        original = capture.capture.read

        def read():
            readers.append(threading.current_thread())
            return original()

        capture.read = read
        return capture

    from mlx_vit.camera import classify_frames

    with FrameSource(clip, capture_factory=factory, keep_all=True) as source:
        results = list(classify_frames(classifier, source, top_k=1))
    assert len(results) == FRAMES
    assert threading.main_thread() not in readers and len(set(readers)) == 1
