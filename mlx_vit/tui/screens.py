"""Modal screens: a one-line prompt, the model picker and the help."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from mlx_vit.errors import shown
from mlx_vit.tui.backend import CachedModel


class PromptScreen(ModalScreen[str | None]):
    """Ask for one line of text (a path, a camera source); Enter answers it, Escape cancels (None)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self._title = title
        self._value = value
        self._placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Text(self._title), classes="dialog-title")
            yield Input(self._value, placeholder=self._placeholder, id="prompt-input")
            yield Label("enter: ok · escape: cancel", classes="dialog-hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip() or None)


class ModelScreen(ModalScreen[tuple[str, str | None] | None]):
    """Pick a converted model from mlx-vit's cache, or type a Hub id or folder. Answers (model, label) or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, cached: list[CachedModel], current: str | None) -> None:
        super().__init__()
        self._cached = cached
        self._current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="model-dialog"):
            yield Label("Choose a model", classes="dialog-title")
            yield Input(placeholder="Hub id (org/name) or model folder, then enter", id="model-input")
            if self._cached:
                yield Label("or one converted before (tab, then ↑ ↓ enter):", classes="dialog-hint")
                yield OptionList(*[Option(Text(shown(m.label))) for m in self._cached], id="cached-models")
            else:
                yield Label("(no converted models in mlx-vit's cache yet)", classes="dialog-hint")
            current = f"current: {shown(self._current)} · " if self._current else ""
            yield Label(Text(f"{current}escape: cancel"), classes="dialog-hint")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        chosen = self._cached[event.option_index]
        self.dismiss((str(chosen.folder), chosen.label))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.value.strip():
            self.dismiss((event.value.strip(), None))


class HelpScreen(ModalScreen[None]):
    """The key bindings, with what each does."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss(None)", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self._keys = keys

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, description in self._keys:
            table.add_row(key, description)
        with Vertical(classes="dialog", id="help-dialog"):
            yield Label("mlx-vit · keys", classes="dialog-title")
            yield Static(table)
            yield Label("The mouse works too: click in the browser and in lists. escape: close", classes="dialog-hint")
