"""`mlx-vit tui` driven with real keys (Textual's pilot) against real converted models and real photos."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from checkpoints import IMAGES, make_checkpoint
from PIL import Image
from tui_support import (
    FakeFrameSource,
    RecordingApp,
    assert_same_predictions,
    reference,
    run_app,
    same_predictions,
    wait_until,
)

from mlx_vit.classify import load
from mlx_vit.convert import convert
from mlx_vit.images import open_image
from mlx_vit.inputs import find_inputs
from mlx_vit.tui.backend import Backend
from mlx_vit.tui.screens import HelpScreen, ModelScreen, PromptScreen
from mlx_vit.tui.widgets import list_folder

# tests/data/images, in the browser's order.
ORDER = ["astronaut.png", "camera.png", "chelsea.png", "horse.png", "logo.png", "multipage.tif",
         "no_time_for_that_tiny.gif", "rocket.jpg"]  # fmt: skip


@pytest.fixture(scope="module")
def mlx_model(vit_folder, tmp_path_factory) -> Path:
    """The seeded test ViT, converted by `mlx-vit convert`'s library function."""
    return convert(str(vit_folder), tmp_path_factory.mktemp("tui") / "vit-mlx")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second converted model with other weights and 7 classes, to switch to."""
    folder = make_checkpoint(tmp_path_factory.mktemp("other-hf"), seed=5, num_labels=7)
    return convert(str(folder), tmp_path_factory.mktemp("tui") / "other-mlx")


def showing(app, model: Path, image: Path):
    """A condition: the app shows what `model` computes for `image`."""
    expected = reference(model, image)
    return lambda: same_predictions(app.predictions.shown(), expected)


def test_browser_lists_folders_then_images_by_name():
    folders, images = list_folder(IMAGES)
    assert folders == [] and [p.name for p in images] == ORDER  # README.md is no image


def test_browser_lists_what_classify_walks_in_its_order(tmp_path):
    """The same rule as `mlx-vit classify FOLDER` (one function): names in code point order, hidden names, other
    files and symlinked folders (which a walk does not follow) left out, a symlinked image kept."""
    for name in ["a.png", "B.png", "IMG_1.JPG", "notes.txt", ".hidden.png", "c/x.png", "Z/y.png", ".h/z.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(IMAGES / "chelsea.png", tmp_path / name)
    (tmp_path / "link").symlink_to(tmp_path / "c")
    (tmp_path / "linked.png").symlink_to(tmp_path / "a.png")
    folders, images = list_folder(tmp_path)
    assert [p.name for p in folders] == ["Z", "c"]
    assert [p.name for p in images] == ["B.png", "IMG_1.JPG", "a.png", "linked.png"]
    walked = [Path(i.path) for i in find_inputs([str(tmp_path)])]
    assert [p for p in walked if p.parent == tmp_path] == images
    assert [p.parent for p in walked if p.parent != tmp_path] == folders


def test_photo_shows_what_the_model_computes(mlx_model):
    """Started on a photo: its preview, the model's top-5 with the library's scores, the model in the status."""
    app = RecordingApp(Backend(), IMAGES / "chelsea.png", str(mlx_model))

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.predictions.predictions)
        assert_same_predictions(app.predictions.shown(), reference(mlx_model, IMAGES / "chelsea.png"))
        assert app.preview.image.size == open_image(IMAGES / "chelsea.png").size
        assert app.model_info.dtype == "float32" and app.model_info.quantization == "not quantized"
        status = str(app.status.query_one("#status-text").render())
        assert "float32 · not quantized · cpu" in status and "inference" in status and "3/8 chelsea.png" in status
        top = app.predictions.shown()[0]
        assert f"1. {top.label}" in str(app.predictions.render())
        assert f"{100 * top.score:.1f}%" in str(app.predictions.render())

    run_app(app, scenario)
    assert app.notified == []


def test_keys_move_through_the_folder(mlx_model):
    """n / p step through the folder's images (clamped at the ends); arrow keys in the browser do too."""
    app = RecordingApp(Backend(), IMAGES / "chelsea.png", str(mlx_model))

    async def shows(pilot, name):
        await wait_until(pilot, showing(app, mlx_model, IMAGES / name))
        assert app.current == IMAGES / name
        assert app.browser.entries[app.browser.highlighted] == IMAGES / name

    async def scenario(pilot):
        await shows(pilot, "chelsea.png")
        await pilot.press("n")
        await shows(pilot, "horse.png")
        await pilot.press("p", "p", "p")
        await shows(pilot, "astronaut.png")
        await pilot.press("p")  # already the first
        await shows(pilot, "astronaut.png")
        await pilot.press("down")
        await shows(pilot, "camera.png")
        await pilot.press("end", "n")
        await shows(pilot, "rocket.jpg")

    run_app(app, scenario)


def test_top_k_keys_and_copy(mlx_model):
    app = RecordingApp(Backend(), IMAGES / "rocket.jpg", str(mlx_model), top_k=3)

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.predictions.predictions)
        assert len(app.predictions.shown()) == 3
        await pilot.press("+", "+")
        assert_same_predictions(app.predictions.shown(), reference(mlx_model, IMAGES / "rocket.jpg", top_k=5))
        await pilot.press("-", "-", "-", "-", "-")  # never below 1
        assert len(app.predictions.shown()) == 1
        await pilot.press("+", "c")
        expected = reference(mlx_model, IMAGES / "rocket.jpg", top_k=2)
        lines = app.clipboard.splitlines()
        assert lines[0] == str(IMAGES / "rocket.jpg")
        assert lines[1:] == [f"{p.label}\t{p.score:.4f}\t{p.class_id}" for p in expected]

    run_app(app, scenario)


def test_open_a_folder_and_descend(mlx_model, tmp_path):
    """o asks for a path; enter on a sub-folder opens it; enter on .. goes back up."""
    (tmp_path / "sub").mkdir()
    shutil.copy(IMAGES / "horse.png", tmp_path / "sub" / "horse.png")
    shutil.copy(IMAGES / "camera.png", tmp_path / "camera.png")
    app = RecordingApp(Backend(), IMAGES, str(mlx_model))

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.model_info)
        assert app.current is None and app.browser.folder == IMAGES
        await pilot.press("o")
        assert isinstance(app.screen, PromptScreen)
        prompt = app.screen.query_one("#prompt-input")
        prompt.value = str(tmp_path)
        await pilot.press("enter")
        assert app.browser.folder == tmp_path.resolve()
        assert [p.name for p in app.browser.entries] == [tmp_path.parent.name, "sub", "camera.png"]
        await pilot.press("down", "enter")  # into sub/
        await wait_until(pilot, lambda: app.browser.folder == (tmp_path / "sub").resolve())
        await pilot.press("down")  # its only image
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "horse.png"))
        await pilot.press("home", "enter")  # ..
        await wait_until(pilot, lambda: app.browser.folder == tmp_path.resolve())
        assert app.browser.entries[app.browser.highlighted].name == "sub"

    run_app(app, scenario)


def test_switch_models_by_folder_and_from_the_cache(mlx_model, other_model, tmp_path, monkeypatch):
    """m lists the converted models in mlx-vit's cache; typing a folder works too. Predictions follow."""
    cache = tmp_path / "cache"
    shutil.copytree(other_model, cache / "acme--tiny-vit" / ("c0ffee" * 6 + "abcd"))
    monkeypatch.setenv("MLX_VIT_CACHE", str(cache))
    app = RecordingApp(Backend(), IMAGES / "chelsea.png", str(mlx_model))

    async def scenario(pilot):
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "chelsea.png"))
        await pilot.press("m")
        assert isinstance(app.screen, ModelScreen)
        await pilot.press("tab", "enter")  # the first (only) cached model is highlighted
        await wait_until(pilot, lambda: app.model_info.labels == 7)
        assert app.model_info.name == "acme/tiny-vit @ c0ffeec0"
        assert "acme/tiny-vit @ c0ffeec0 · float32" in str(app.status.query_one("#status-text").render())
        expected = reference(other_model, IMAGES / "chelsea.png")
        await wait_until(pilot, lambda: same_predictions(app.predictions.shown(), expected))
        assert_same_predictions(app.predictions.shown(), expected)
        # Back to the first model, typed into the picker's input.
        await pilot.press("m")
        await pilot.press(*str(mlx_model))  # typed into the picker's input
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.model_info.labels == 10)
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "chelsea.png"))

    run_app(app, scenario)
    assert app.notified == []


def test_broken_image_is_a_notification(mlx_model, tmp_path):
    (tmp_path / "a-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    shutil.copy(IMAGES / "rocket.jpg", tmp_path / "b-rocket.jpg")
    app = RecordingApp(Backend(), tmp_path / "a-broken.jpg", str(mlx_model))

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.notified)
        assert app.notified[0][0] == "error" and "a-broken.jpg" in app.notified[0][1]
        assert app.preview.image is None and app.predictions.note == "cannot read this image"
        await pilot.press("n")
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "rocket.jpg"))

    run_app(app, scenario)


def test_model_that_wont_load_is_a_notification(mlx_model, tmp_path):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"format": "mlx-vit", "model": {')
    app = RecordingApp(Backend(), IMAGES / "chelsea.png", str(bad))

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.notified)
        severity, message = app.notified[0]
        assert severity == "error" and "bad-model/config.json" in message
        assert app.model_info is None
        await wait_until(pilot, lambda: "no model loaded" in app.predictions.note)
        await pilot.press("m")
        app.screen.query_one("#model-input").value = str(mlx_model)
        await pilot.press("enter")
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "chelsea.png"))

    run_app(app, scenario)


def test_webcam_classifies_the_newest_frame(mlx_model):
    """--camera: frames from the source are previewed and classified, with frames per second; the end of the
    stream is a notification and the app returns to the images."""
    photos = [IMAGES / "chelsea.png", IMAGES / "rocket.jpg"]
    sources: list[FakeFrameSource] = []

    def frame_source(source):
        sources.append(FakeFrameSource(source, photos, hold=True))
        return sources[-1]

    app = RecordingApp(Backend(), IMAGES / "horse.png", str(mlx_model), camera="0", frame_source=frame_source)

    async def scenario(pilot):
        await wait_until(pilot, lambda: sources and sources[0].delivered == 2 and app.predictions.predictions)
        last = Image.fromarray(sources[0].frames[-1])
        await wait_until(pilot, lambda: app.preview.image is not None and app.preview.image.size == last.size)
        assert sources[0].source == 0  # "0" is camera index 0
        assert_same_predictions(app.predictions.shown(), reference(mlx_model, last))
        assert "camera 0 · frame 1 · " in app.status.position and app.status.position.endswith(" fps")
        await pilot.press("w")  # webcam off: the source is closed, the image is back
        await wait_until(pilot, lambda: sources[0].closed)
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "horse.png"))

    run_app(app, scenario)
    assert app.notified == []


def test_attention_key_overlays_the_map_on_photos_and_frames(mlx_model):
    """a: the preview becomes the model's view with the rollout map over it (as `mlx-vit explain` draws it), the
    predictions stay the model's; a again gives the photo back. In webcam mode the frames follow the key."""
    from mlx_vit.explain import explain, overlay

    photo = IMAGES / "chelsea.png"
    classifier = load(str(mlx_model))
    found = explain(classifier, open_image(photo), "rollout", top_k=5)
    expected = np.asarray(overlay(found.view, found.maps[0]))
    sources: list[FakeFrameSource] = []

    def frame_source(source):
        sources.append(FakeFrameSource(source, [photo], hold=True))
        return sources[-1]

    app = RecordingApp(Backend(), photo, str(mlx_model), frame_source=frame_source)

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.predictions.predictions)
        await pilot.press("a")
        await wait_until(pilot, lambda: app.preview.image.size == expected.shape[1::-1])
        assert np.array_equal(np.asarray(app.preview.image), expected)
        assert str(app.preview.border_title).startswith("attention · attention rollout")
        assert_same_predictions(app.predictions.shown(), reference(mlx_model, photo))
        await pilot.press("a")
        await wait_until(pilot, lambda: app.preview.image.size == open_image(photo).size)
        await pilot.press("a")
        app.start_camera("0")
        await wait_until(
            pilot, lambda: app.preview.image is not None and app.preview.image.size == expected.shape[1::-1]
        )
        assert "attention" in str(app.preview.border_title)

    run_app(app, scenario)
    assert [m for _, m in app.notified if not m.startswith("attention map")] == []


def test_webcam_key_prompts_for_a_video_and_stops_at_its_end(mlx_model):
    sources: list[FakeFrameSource] = []

    def frame_source(source):
        sources.append(FakeFrameSource(source, [IMAGES / "camera.png"]))
        return sources[-1]

    app = RecordingApp(Backend(), IMAGES, str(mlx_model), frame_source=frame_source)

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.model_info)
        await pilot.press("w")
        assert isinstance(app.screen, PromptScreen)
        app.screen.query_one("#prompt-input").value = "clip.mp4"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.notified)
        assert sources[0].source == "clip.mp4" and sources[0].closed
        assert app.notified == [("warning", "clip.mp4: end of stream")]
        assert not app.webcam_on

    run_app(app, scenario)


def test_camera_that_wont_open_is_a_notification(mlx_model):
    def frame_source(source):
        return FakeFrameSource(source, fail_open="camera 3: cannot open it: no /dev/video3")

    app = RecordingApp(Backend(), IMAGES / "chelsea.png", str(mlx_model), camera="3", frame_source=frame_source)

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.notified and app.predictions.predictions)
        assert app.notified == [("error", "camera 3: cannot open it: no /dev/video3")]
        assert not app.webcam_on
        assert same_predictions(app.predictions.shown(), reference(mlx_model, IMAGES / "chelsea.png"))

    run_app(app, scenario)


def test_help_lists_every_key_and_palette_has_the_commands(mlx_model):
    app = RecordingApp(Backend(), IMAGES, None)

    async def scenario(pilot):
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        keys = [key for key, _ in app.help_rows()]
        assert keys[:11] == ["o", "n", "p", "w", "m", "+", "-", "a", "c", "?", "q"]
        await pilot.press("n")  # main-screen keys are off under a modal screen
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert "Choose a model: converted ones from the cache, a Hub id or a folder" in titles
        assert "Webcam mode on/off (asks for a camera index or a video file)" in titles

    run_app(app, scenario)


def test_ui_stays_responsive_while_a_model_loads(mlx_model):
    """The model loads on the backend thread: keys work meanwhile, and a progress bar shows until it is ready."""
    release = threading.Event()

    def slow_load(model: str):
        assert threading.current_thread().name == "mlx-vit-backend"  # all MLX work on the one backend thread
        release.wait(30)
        return load(model)

    app = RecordingApp(Backend(load_classifier=slow_load), IMAGES / "chelsea.png", str(mlx_model))

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.preview.image is not None)  # opened while the model still loads
        assert app.status.busy.startswith("loading ") and app.status.query_one("#loading-bar").display
        await pilot.press("n", "n")
        await wait_until(pilot, lambda: app.preview.image.size == open_image(IMAGES / "logo.png").size)
        assert app.current == IMAGES / "logo.png" and not app.predictions.predictions
        release.set()
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "logo.png"))
        assert not app.status.busy and not app.status.query_one("#loading-bar").display

    run_app(app, scenario)


def test_mouse_click_in_the_browser(mlx_model):
    app = RecordingApp(Backend(), IMAGES, str(mlx_model))

    async def scenario(pilot):
        await pilot.click("#browser", offset=(4, 3))  # row 3: the border, "..", astronaut.png, camera.png
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "camera.png"))

    run_app(app, scenario)


@pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")  # inside textual-image, Pillow 13
def test_preview_with_textual_image_widget(mlx_model):
    """Where the terminal has Sixel or Kitty graphics, textual-image's widget draws the preview."""
    from textual_image.widget import HalfcellImage

    app = RecordingApp(Backend(), IMAGES / "horse.png", str(mlx_model), graphics=HalfcellImage)

    async def scenario(pilot):
        await wait_until(pilot, showing(app, mlx_model, IMAGES / "horse.png"))
        inner = app.preview.query_one(HalfcellImage)
        assert inner.image is app.preview.image and inner.image.size == open_image(IMAGES / "horse.png").size
        assert inner.size.width > 10 and inner.size.height > 10

    run_app(app, scenario)
