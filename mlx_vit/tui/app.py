"""`mlx-vit tui`: browse a folder of images (or watch a camera) and see what a ViT thinks of each picture.

The App is given its Backend, which does every MLX call on one thread; the UI asks it for futures and turns
their answers (plain dataclasses) into messages. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

from PIL import Image
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Footer, Header

from mlx_vit.errors import MlxVitError, shown
from mlx_vit.images import open_image
from mlx_vit.tui import messages
from mlx_vit.tui.backend import MAX_TOP_K, Backend, Classification, ModelInfo, Superseded, cached_models, error_text
from mlx_vit.tui.screens import HelpScreen, ModelScreen, PromptScreen
from mlx_vit.tui.webcam import Webcam
from mlx_vit.tui.widgets import (
    FolderBrowser,
    GraphicsPreview,
    ImagePreview,
    PredictionBars,
    StatusLine,
    graphics_widget,
    seconds_text,
)

# Actions that act on the main screen; a modal screen (prompt, model picker, help) switches them off.
MAIN_ACTIONS = {"open", "next", "previous", "webcam", "model", "attention", "top_k", "copy", "help"}


class _ForwardLog(logging.Handler):
    """mlx-vit's log lines (download, conversion) go to the status line instead of the terminal under the TUI."""

    def __init__(self, app: App) -> None:
        super().__init__(logging.INFO)
        self._app = app

    def emit(self, record: logging.LogRecord) -> None:
        self._app.post_message(messages.ModelProgress(record.getMessage()))


def display_path(path: str | Path) -> str:
    """A path relative to the current folder when it is inside it, else with ~ for the home folder; control
    characters escaped, as everywhere text from a file name or a model reaches the screen."""
    path = Path(path)
    if not path.is_absolute():
        return shown(path)
    try:
        return shown(str(path.relative_to(Path.cwd())))
    except ValueError:
        pass
    try:
        return shown(str(Path("~") / path.relative_to(Path.home())))
    except (ValueError, RuntimeError):
        return shown(path)


class MlxVitApp(App[None]):
    """Browse, preview and classify images and camera frames."""

    CSS_PATH = Path(__file__).parent / "app.tcss"  # absolute, so subclasses elsewhere find it too
    TITLE = "mlx-vit"
    BINDINGS = [
        Binding("o", "open", "Open", tooltip="Open an image or a folder (type its path)"),
        Binding("n", "next", "Next", tooltip="Next image in the folder"),
        Binding("p", "previous", "Prev", tooltip="Previous image in the folder"),
        Binding("w", "webcam", "Webcam", tooltip="Webcam mode on/off (asks for a camera index or a video file)"),
        Binding("m", "model", "Model", tooltip="Choose a model: converted ones from the cache, a Hub id or a folder"),
        Binding("plus,equals_sign", "top_k(1)", "Top-k+", key_display="+", tooltip="Show one more prediction"),
        Binding("minus", "top_k(-1)", "Top-k-", key_display="-", tooltip="Show one prediction fewer"),
        Binding("a", "attention", "Attention", tooltip="Overlay the attention map (rollout) on the image or camera"),
        Binding("c", "copy", "Copy", tooltip="Copy the predictions shown to the clipboard"),
        Binding("question_mark,f1", "help", "Help", key_display="?", tooltip="Show the keys"),
        Binding("q", "quit", "Quit", tooltip="Quit"),
    ]

    def __init__(self, backend: Backend, path: Path = Path("."), model: str | None = None, *,
                 model_label: str | None = None, top_k: int = 5, camera: str | None = None,
                 frame_source: Callable[[int | str], Any] | None = None,
                 graphics: type[Widget] | None = None) -> None:  # fmt: skip
        """`path` is an image (shown and classified at start) or a folder; `model` is loaded at start if given.

        `camera` starts webcam mode on that source ("0", a video file); `frame_source` makes a FrameSource from
        a camera index or path (default: mlx_vit.camera.FrameSource). `graphics` is textual-image's widget class
        to draw the preview with Sixel/Kitty graphics (see widgets.graphics_widget); half blocks without it.
        """
        super().__init__()
        self.backend = backend
        path = Path(path).expanduser().resolve()
        self._start_image = path if path.is_file() else None
        self._start_folder = path.parent if path.is_file() else path
        self._start_model = (model, model_label) if model else None
        self._start_camera = camera
        self.webcam = Webcam(backend, frame_source, spec=camera or "0", id="webcam")  # composed with the rest
        self._graphics = graphics
        self.top_k = max(1, min(MAX_TOP_K, top_k))
        self.current: Path | None = None  # the image chosen in the browser
        self.model_info: ModelInfo | None = None
        self._request = 0  # number of the newest classification asked for; older answers are dropped
        self.attention = False  # overlay the attention map
        self._image: Image.Image | None = None  # the current photo, without any overlay
        self._log_handler = _ForwardLog(self)
        self._saved_logging: tuple[list[logging.Handler], int] | None = None

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = True) -> None:  # fmt: skip
        """Every notification as plain text: messages quote file names and labels, which are neither markup
        nor terminal commands."""
        super().notify(shown(message, 500), title=shown(title, 80), severity=severity, timeout=timeout, markup=False)

    # Layout and start-up

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield FolderBrowser(self._start_folder, id="browser")
            yield GraphicsPreview(self._graphics, id="preview") if self._graphics else ImagePreview(id="preview")
            with Vertical(id="side"):
                yield PredictionBars(id="predictions")
        yield StatusLine(id="status")
        yield Footer()
        yield self.webcam

    def on_mount(self) -> None:
        logger = logging.getLogger("mlx_vit")
        self._saved_logging = (logger.handlers[:], logger.level)
        logger.handlers[:] = [self._log_handler]
        logger.setLevel(logging.INFO)
        self.predictions.top_k = self.top_k
        self.predictions.show_note("choose an image")
        self.query_one("#preview").border_title = "preview"
        self.query_one("#side").border_title = "predictions"
        self._open_folder(self._start_folder, self._start_image)
        if self._start_model:
            self.load_model(*self._start_model)
        if self._start_image:
            self.show_image(self._start_image)
        if self._start_camera:
            self.start_camera(self._start_camera)
        self.query_one("#browser").focus()

    def on_unmount(self) -> None:
        if self._saved_logging is not None:
            logger = logging.getLogger("mlx_vit")
            logger.handlers[:], level = self._saved_logging
            logger.setLevel(level)

    @property
    def preview(self) -> ImagePreview | GraphicsPreview:
        return self.query_one("#preview")  # type: ignore[return-value]

    @property
    def predictions(self) -> PredictionBars:
        return self.query_one("#predictions", PredictionBars)

    @property
    def status(self) -> StatusLine:
        return self.query_one("#status", StatusLine)

    @property
    def browser(self) -> FolderBrowser:
        return self.query_one("#browser", FolderBrowser)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MAIN_ACTIONS and isinstance(self.screen, ModalScreen):
            return False
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in self.BINDINGS:
            if isinstance(binding, Binding) and binding.action != "quit":
                yield SystemCommand(binding.tooltip, f"key: {binding.key_display or binding.key}",
                                    lambda action=binding.action: self.run_action(action))  # fmt: skip

    def help_rows(self) -> list[tuple[str, str]]:
        rows = [(b.key_display or b.key, b.tooltip) for b in self.BINDINGS if isinstance(b, Binding)]
        return rows + [("↑ ↓ enter", "Move in the browser; enter opens a folder"), ("ctrl+p", "Command palette")]

    # Browsing

    def _open_folder(self, folder: Path, highlight: Path | None = None) -> bool:
        try:
            self.browser.show_folder(folder, highlight)
        except OSError as error:
            self.notify(f"{folder}: cannot list ({error.strerror or error})", severity="error")
            return False
        return True

    @on(FolderBrowser.ImageHighlighted)
    def _image_highlighted(self, event: FolderBrowser.ImageHighlighted) -> None:
        self.show_image(event.path)

    def show_image(self, path: Path) -> None:
        """Make `path` the current image: open it off the UI thread, then preview and classify it."""
        path = path.resolve()
        if path == self.current:
            return
        self.current = path
        self.sub_title = display_path(path)
        self._update_position()
        if not self.webcam_on:
            self._open_image(path)

    def _update_position(self) -> None:
        images = self.browser.images()
        where = f"{images.index(self.current) + 1}/{len(images)} " if self.current in images else ""
        self.status.position = f"{where}{shown(self.current.name)}" if self.current else ""

    @work(thread=True, exclusive=True, group="open")
    def _open_image(self, path: Path) -> None:
        try:
            image = open_image(path)
        except MlxVitError as error:
            self.post_message(messages.ImageFailed(path, str(error)))
            return
        self.post_message(messages.ImageOpened(path, image))

    def on_image_opened(self, message: messages.ImageOpened) -> None:
        if message.path != self.current or self.webcam_on:
            return
        self._image = message.image
        self.preview.set_image(message.image)
        self.classify(message.image)

    def on_image_failed(self, message: messages.ImageFailed) -> None:
        if message.path != self.current:
            return
        self._request += 1  # whatever was being classified is no longer what is shown
        self._image = None
        self.preview.set_image(None)
        self.predictions.show_note("cannot read this image")
        self.notify(message.error, title="image", severity="error")

    def classify(self, image: Image.Image) -> None:
        self._request += 1
        self._classify(self._request, image, self.attention)

    @work(group="classify")
    async def _classify(self, request: int, image: Image.Image, attention: bool) -> None:
        try:
            result = await asyncio.wrap_future(self.backend.classify(image, attention))
        except (Superseded, CancelledError, asyncio.CancelledError):
            return
        except Exception as error:
            self.post_message(messages.ClassifyFailed(request, error_text(error)))
            return
        self.post_message(messages.Classified(request, result))

    def on_classified(self, message: messages.Classified) -> None:
        if message.request != self._request:
            return
        result = message.result
        if result.overlay is not None and self.attention:
            self.preview.set_image(result.overlay)
            self.preview.border_title = Text(f"attention · {result.attention}")  # the model's view, its map over it
        self._show_predictions(result)

    def _show_predictions(self, result: Classification) -> None:
        self.predictions.show(result.predictions)
        self.status.timing = f"inference {seconds_text(result.seconds)}"

    def on_classify_failed(self, message: messages.ClassifyFailed) -> None:
        if message.request != self._request:
            return
        self.predictions.show_note(message.error)
        if self.model_info is not None:
            self.notify(message.error, title="classify", severity="error")

    # Models

    def load_model(self, model: str, label: str | None = None) -> None:
        """Load a model on the backend thread; the current one stays in use until the new one is ready."""
        self.status.busy = f"loading {label or model} …"
        self._load_model(model, label)

    @work(group="model")
    async def _load_model(self, model: str, label: str | None) -> None:
        try:
            info = await asyncio.wrap_future(self.backend.load(model, label))
        except (CancelledError, asyncio.CancelledError):  # the app is closing
            return
        except Exception as error:
            self.post_message(messages.ModelFailed(model, error_text(error)))
            return
        self.post_message(messages.ModelLoaded(info))

    def on_model_progress(self, message: messages.ModelProgress) -> None:
        status = self.status
        if status.busy:
            status.busy = f"loading: {message.text}"

    def on_model_loaded(self, message: messages.ModelLoaded) -> None:
        info = self.model_info = message.info
        status = self.status
        status.busy = ""
        status.model = f"{display_path(info.name)} · {info.dtype} · {info.quantization} · {info.device}"
        if self._image is not None and not self.webcam_on:
            self.classify(self._image)

    def on_model_failed(self, message: messages.ModelFailed) -> None:
        self.status.busy = ""
        self.notify(message.error, title="model not loaded", severity="error", timeout=10)

    # Webcam mode: the Webcam widget runs the camera; the App shows its frames in place of the current image

    @property
    def webcam_on(self) -> bool:
        return self.webcam.running

    def start_camera(self, spec: str) -> None:
        """Open the camera or video file `spec` and classify its newest frames until stopped."""
        self.stop_camera()
        webcam = self.webcam
        try:
            webcam.start(spec)
        except (MlxVitError, OSError) as error:
            self.notify(error_text(error), title="webcam", severity="error", timeout=10)
            return
        self._request += 1  # drop any image classification still on its way
        self.sub_title = f"webcam {shown(spec)}"
        self.preview.set_image(None)
        self.predictions.show_note("waiting for the first frame …")
        self.status.position = webcam.source_name
        self._webcam_title()

    def _webcam_title(self) -> None:
        attention = " · attention" if self.attention else ""
        self.preview.border_title = Text(f"webcam · {self.webcam.source_name}{attention}")  # Text: names are not markup

    def stop_camera(self) -> None:
        """Leave webcam mode (the camera thread ends after its current frame) and show the current image again."""
        if not self.webcam.stop():
            return
        self.preview.border_title = "preview"
        self.preview.set_image(None)
        self.predictions.show_note("choose an image")
        current, self.current = self.current, None
        if current is not None:
            self.show_image(current)
        else:
            self.sub_title = ""
            self._update_position()

    def on_camera_frame(self, message: messages.CameraFrame) -> None:
        webcam = self.webcam
        if not webcam.is_current(message):
            return
        self.preview.set_image(message.image)
        fps = f" · {message.fps:.1f} fps" if message.fps is not None else ""
        self.status.position = f"{webcam.source_name} · frame {message.index}{fps}"
        if message.result is None:
            self.predictions.show_note(message.error or "")
            return
        self._show_predictions(message.result)

    def on_camera_stopped(self, message: messages.CameraStopped) -> None:
        if not self.webcam.is_current(message):
            return
        self.stop_camera()
        self.notify(message.error or "camera stopped", title="webcam", severity="warning")

    # Actions

    def action_open(self) -> None:
        def answer(text: str | None) -> None:
            if text:
                self.open_path(Path(text).expanduser())

        default = str(self.current or self.browser.folder)
        self.push_screen(PromptScreen("Open an image or a folder", default), answer)

    def open_path(self, path: Path) -> None:
        path = path.resolve()
        if path.is_dir():
            self._open_folder(path)
        elif path.is_file() and self._open_folder(path.parent, path):
            self.show_image(path)
        else:
            self.notify(f"{path}: no such file or folder", severity="error")

    def action_next(self) -> None:
        self._step(1)

    def action_previous(self) -> None:
        self._step(-1)

    def _step(self, delta: int) -> None:
        browser = self.browser
        target = browser.step(self.current, delta)
        if target is None:
            self.notify("no images in this folder", severity="warning")
        elif target == self.current:
            self.bell()
        else:
            self.show_image(target)

    def action_webcam(self) -> None:
        if self.webcam_on:
            self.stop_camera()
            return

        def answer(text: str | None) -> None:
            if text:
                self.start_camera(text)

        self.push_screen(PromptScreen("Camera index or video file", self.webcam.spec), answer)

    def action_model(self) -> None:
        def answer(choice: tuple[str, str | None] | None) -> None:
            if choice:
                self.load_model(*choice)

        try:
            cached = cached_models()
        except OSError as error:
            self.notify(f"model cache: cannot list ({error})", severity="warning")
            cached = []
        current = self.model_info.name if self.model_info else None
        self.push_screen(ModelScreen(cached, current), answer)

    def action_attention(self) -> None:
        """Overlay the attention map, or take it away: the next answer (photo or frame) follows, the UI never waits."""
        self.attention = not self.attention
        self.notify(f"attention map {'on: rollout over the model’s view of the image' if self.attention else 'off'}")
        self.webcam.attention = self.attention
        if self.webcam_on:
            self._webcam_title()
        elif self._image is not None:
            if not self.attention:
                self.preview.set_image(self._image)
                self.preview.border_title = "preview"
            self.classify(self._image)

    def action_top_k(self, delta: int) -> None:
        self.top_k = max(1, min(MAX_TOP_K, self.top_k + delta))
        self.predictions.top_k = self.top_k

    def action_copy(self) -> None:
        predictions = self.predictions.shown()
        if not predictions:
            self.notify("nothing to copy yet", severity="warning")
            return
        what = f"webcam {self.webcam.spec}" if self.webcam_on else str(self.current)
        # Pasted into a terminal, a control character in a label would act there: escaped, as on screen.
        lines = [shown(what)] + [f"{shown(p.label)}\t{p.score:.4f}\t{p.class_id}" for p in predictions]
        self.copy_to_clipboard("\n".join(lines) + "\n")
        self.notify(f"copied {len(predictions)} predictions")

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.help_rows()))


def run(path: Path, model: str, top_k: int = 5, camera: str | None = None, graphics: bool = True) -> None:
    """Run the TUI in this terminal until the user quits; `graphics=False` always draws with half blocks."""
    if not path.exists():
        raise MlxVitError(f"{path}: no such file or folder")
    widget = graphics_widget() if graphics else None
    backend = Backend()
    try:
        MlxVitApp(backend, path, model, top_k=top_k, camera=camera, graphics=widget).run()
    finally:
        backend.close()
