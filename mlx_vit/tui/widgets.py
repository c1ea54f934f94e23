"""The TUI's widgets: a folder browser of images, an image preview, prediction bars and the status line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Label, OptionList, ProgressBar
from textual.widgets.option_list import Option

from mlx_vit.classify import Prediction
from mlx_vit.errors import shown
from mlx_vit.inputs import folder_listing


def list_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, image files) as `mlx-vit classify FOLDER` walks them (mlx_vit.inputs.folder_listing): the
    same names in the same order, hidden ones and symlinked folders left out. Raises OSError."""
    entries = folder_listing(folder)
    folders = [Path(path) for _, path, is_dir in entries if is_dir]
    return folders, [Path(path) for _, path, is_dir in entries if not is_dir]


class FolderBrowser(OptionList):
    """One folder at a time: `..`, its sub-folders, its images. Highlighting an image chooses it."""

    class ImageHighlighted(Message):
        def __init__(self, path: Path) -> None:
            super().__init__()
            self.path = path

    def __init__(self, folder: Path, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.folder = folder.resolve()
        self.entries: list[Path] = []  # parallel to the options
        self._images: list[Path] = []

    def show_folder(self, folder: Path, highlight: Path | None = None) -> None:
        """List `folder` (raises OSError) and highlight `highlight`, or the first entry."""
        folder = folder.resolve()
        folders, images = list_folder(folder)
        up = [folder.parent] if folder.parent != folder else []
        self.folder = folder
        self.entries = up + folders + images
        self._images = images
        # File names as Text (not markup), control characters escaped (a name must not retitle the terminal).
        labels = [Text("▲ ..", style="bold") for _ in up]
        labels += [Text(f"▸ {shown(p.name)}/", style="bold") for p in folders]
        self.set_options([Option(label) for label in labels + [Text(f"  {shown(p.name)}") for p in images]])
        self.border_title = Text(shown(folder.name or str(folder)))
        self.border_subtitle = f"{len(self.images())} images"
        if highlight is not None and highlight in self.entries:
            self.highlighted = self.entries.index(highlight)
        elif self.entries:
            self.highlighted = 0

    def images(self) -> list[Path]:
        return self._images

    def highlight_path(self, path: Path) -> bool:
        path = path.resolve()
        if path not in self.entries:
            return False
        self.highlighted = self.entries.index(path)
        return True

    def step(self, current: Path | None, delta: int) -> Path | None:
        """The image `delta` places after `current` in this folder (clamped), highlighted; None if there are none."""
        images = self.images()
        if not images:
            return None
        index = images.index(current) + delta if current in images else (0 if delta > 0 else len(images) - 1)
        target = images[max(0, min(len(images) - 1, index))]
        self.highlight_path(target)
        return target

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        entry = self.entries[event.option_index]
        if entry in self._images:
            self.post_message(self.ImageHighlighted(entry))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        entry = self.entries[event.option_index]
        if entry not in self._images:  # a folder
            try:
                self.show_folder(entry, highlight=self.folder if entry == self.folder.parent else None)
            except OSError as error:
                self.notify(f"{entry}: cannot list ({error.strerror or error})", severity="error")


class ImagePreview(Widget):
    """An image drawn with half blocks: each cell shows two pixels, foreground on top, background below.

    Works in every terminal with true colour, and renders the same everywhere (snapshot tests rely on that).
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._image: Image.Image | None = None
        self._strips: list[Strip] = []
        self._strips_size = Size(0, 0)

    @property
    def image(self) -> Image.Image | None:
        return self._image

    def set_image(self, image: Image.Image | None) -> None:
        self._image = image
        self._strips_size = Size(0, 0)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        if self.size != self._strips_size:
            self._strips = self._draw(self.size)
            self._strips_size = self.size
        return self._strips[y] if y < len(self._strips) else Strip.blank(self.size.width)

    def _draw(self, size: Size) -> list[Strip]:
        if self._image is None or size.width < 1 or size.height < 1:
            return []
        # Cells are about twice as tall as wide, so a cell's two half blocks are square pixels.
        scale = min(size.width / self._image.width, 2 * size.height / self._image.height)
        width = max(1, round(self._image.width * scale))
        height = max(2, round(self._image.height * scale / 2) * 2)
        pixels = np.asarray(self._image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
        left = (size.width - width) // 2
        top = (size.height - height // 2) // 2
        strips = [Strip.blank(size.width)] * top
        pad_left, pad_right = Segment(" " * left), Segment(" " * (size.width - width - left))
        for row in range(0, height, 2):
            segments = [pad_left]
            for upper, lower in zip(pixels[row], pixels[row + 1], strict=True):
                segments.append(Segment("▀", Style(color=Color.from_rgb(*upper), bgcolor=Color.from_rgb(*lower))))
            segments.append(pad_right)
            strips.append(Strip(segments, size.width))
        return strips


def graphics_widget() -> type[Widget] | None:
    """textual-image's widget if this terminal draws Sixel or Kitty graphics, else None (use half blocks).

    Call it before the App starts: textual-image asks the terminal on import, which it cannot do once Textual
    reads the keyboard.
    """
    try:
        from textual_image.renderable import Image as best
        from textual_image.renderable import SixelImage, TGPImage
    except ImportError:
        return None
    if best not in (SixelImage, TGPImage):
        return None
    from textual_image.widget import Image as GraphicsImage

    return GraphicsImage


class GraphicsPreview(Widget):
    """The preview drawn by textual-image with the terminal's graphics protocol (Sixel, Kitty)."""

    def __init__(self, widget_class: type[Widget], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._widget_class = widget_class
        self._image: Image.Image | None = None

    @property
    def image(self) -> Image.Image | None:
        return self._image

    def compose(self) -> ComposeResult:
        yield self._widget_class(id="graphics-image")

    def set_image(self, image: Image.Image | None) -> None:
        self._image = image
        self.query_one("#graphics-image").image = image


class PredictionBars(Widget):
    """The top-k predictions as labelled bars with scores, or a note when there are none."""

    COMPONENT_CLASSES = {"bars--label", "bars--bar", "bars--top-bar", "bars--score", "bars--note"}
    _EIGHTHS = " ▏▎▍▌▋▊▉█"

    predictions: reactive[tuple[Prediction, ...]] = reactive((), layout=True)
    top_k: reactive[int] = reactive(5, layout=True)
    note: reactive[str] = reactive("", layout=True)

    def show(self, predictions: list[Prediction]) -> None:
        self.note = ""
        self.predictions = tuple(predictions)

    def show_note(self, note: str) -> None:
        self.predictions = ()
        self.note = note

    def shown(self) -> list[Prediction]:
        return list(self.predictions[: self.top_k])

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return 2 * len(self.shown()) if self.predictions else 1

    def render(self) -> Text:
        if not self.predictions:
            return Text(self.note, style=self.get_component_rich_style("bars--note"))
        width = max(self.size.width, 12)
        bar_width = width - 7  # " 100.0%"
        text = Text(no_wrap=True, overflow="ellipsis")
        for rank, prediction in enumerate(self.shown(), 1):
            label = f"{rank}. {shown(prediction.label)}"
            if len(label) > width:
                label = label[: width - 1] + "…"
            text.append(label + "\n", self.get_component_rich_style("bars--label"))
            eighths = round(max(0.0, min(1.0, prediction.score)) * bar_width * 8)
            full, part = divmod(eighths, 8)
            bar = "█" * full + (self._EIGHTHS[part] if part else "")
            style = "bars--top-bar" if rank == 1 else "bars--bar"
            text.append(bar.ljust(bar_width), self.get_component_rich_style(style))
            text.append(f"{100 * prediction.score:6.1f}%", self.get_component_rich_style("bars--score"))
            if rank < len(self.shown()):
                text.append("\n")
        return text


class StatusLine(Horizontal):
    """Model (name, dtype, quantization, device), last inference time, position; a bar while a model loads."""

    model: reactive[str] = reactive("no model")
    timing: reactive[str] = reactive("")
    position: reactive[str] = reactive("")
    busy: reactive[str] = reactive("")  # non-empty while a model loads: what is happening (not Widget.loading)

    def compose(self) -> ComposeResult:
        yield Label(id="status-text")
        yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="loading-bar")

    def _update(self) -> None:
        if not self.is_mounted:
            return
        parts = [self.busy or self.model, self.timing, self.position]
        self.query_one("#status-text", Label).update(Text(" │ ".join(p for p in parts if p)))
        self.query_one("#loading-bar").display = bool(self.busy)

    def on_mount(self) -> None:
        self._update()

    def watch_model(self) -> None:
        self._update()

    def watch_timing(self) -> None:
        self._update()

    def watch_position(self) -> None:
        self._update()

    def watch_busy(self) -> None:
        self._update()


def seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
