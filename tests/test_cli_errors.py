"""The CLI in process, through typer's CliRunner (which bypasses `main()`): each command hands the library the model
it was given, as one ModelChoice, and a library error becomes its one line in one place."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from mlx_vit.choice import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, ModelChoice
from mlx_vit.cli import app
from mlx_vit.errors import CameraError, ModelNotFoundError

runner = CliRunner()

# Every field different from its default and from the others, so a dropped or swapped option shows.
GIVEN = ["-m", "some/model", "--revision", "v2", "--max-pixels", "1000", "--image-size", "384",
         "--arch", "vit_tiny_patch16_224"]  # fmt: skip
CHOICE = ModelChoice(model="some/model", revision="v2", max_pixels=1000, image_size=384, arch="vit_tiny_patch16_224")


def commands(tmp_path) -> list[list[str]]:
    """Each command line that loads a model through a ModelChoice."""
    return [["classify", "x.png"], ["classify", "--camera"], ["embed", "x.png", "-o", str(tmp_path / "x.npy")],
            ["explain", "x.png", "-o", str(tmp_path / "x.png")]]  # fmt: skip


pytestmark = pytest.mark.usefixtures("restored_logging")


@pytest.fixture
def loads(monkeypatch) -> list[ModelChoice]:
    """The choices the commands load, each failing as a model that is not there does."""
    seen = []

    def load(choice: ModelChoice):
        seen.append(choice)
        raise ModelNotFoundError(f"{choice.model}: no such model (a test)")

    monkeypatch.setattr(ModelChoice, "load", load)
    return seen


@pytest.mark.parametrize("command", range(4), ids=["classify", "classify --camera", "embed", "explain"])
def test_each_command_loads_the_model_it_was_given(command, loads, tmp_path):
    result = runner.invoke(app, [*commands(tmp_path)[command], *GIVEN])
    assert loads == [CHOICE]
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "error: some/model: no such model (a test)\n"


@pytest.mark.parametrize("command", range(4), ids=["classify", "classify --camera", "embed", "explain"])
def test_the_commands_defaults_are_the_choices(command, loads, tmp_path):
    runner.invoke(app, commands(tmp_path)[command])
    assert loads == [ModelChoice()] and loads[0].model == DEFAULT_MODEL and loads[0].max_pixels == DEFAULT_MAX_PIXELS


def test_debug_lets_the_error_through_as_a_traceback(loads):
    result = runner.invoke(app, ["--debug", "classify", "x.png"])
    assert isinstance(result.exception, ModelNotFoundError)
    assert "error:" not in result.stderr


def test_a_choice_loads_with_every_field_by_keyword(monkeypatch):
    import mlx_vit.classify

    calls = []
    monkeypatch.setattr(mlx_vit.classify, "load", lambda **chosen: calls.append(chosen) or "a classifier")
    assert CHOICE.load() == "a classifier"
    assert calls == [{"model": "some/model", "revision": "v2", "max_pixels": 1000, "image_size": 384,
                      "arch": "vit_tiny_patch16_224"}]  # fmt: skip


def test_a_camera_error_is_its_line_then_the_summary(monkeypatch):
    """The camera's error is printed where every error is; the summary of the frames before it follows."""
    from mlx_vit import camera

    class Source:  # FrameSource without OpenCV
        name = "camera 0"

        def __init__(self, spec, keep_all):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def frames(classifier, source, top_k, fps):
        yield SimpleNamespace(frame=SimpleNamespace(index=0, timestamp=0.0), predictions=[], latency_ms=1.0)
        raise CameraError("camera 0: gone")

    monkeypatch.setattr(ModelChoice, "load", lambda choice: SimpleNamespace(name="tiny"))
    monkeypatch.setattr(camera, "FrameSource", Source)
    monkeypatch.setattr(camera, "classify_frames", frames)
    result = runner.invoke(app, ["classify", "--camera", "--format", "jsonl"])
    assert result.exit_code == 1 and result.stdout.count("\n") == 1
    error, summary = result.stderr.splitlines()
    assert error == "error: camera 0: gone"
    assert summary.startswith("camera 0: 1 frames classified in ") and summary.endswith("stopped by the error above")


HEAVY = ("mlx", "PIL", "huggingface_hub", "numpy")


@pytest.mark.parametrize("args", [["--help"], ["classify", "--help"], ["embed", "--help"]], ids=" ".join)
def test_help_imports_nothing_heavy(args):
    """`mlx-vit --help` shows the defaults (from mlx_vit.choice) without loading mlx, PIL or huggingface_hub."""
    script = ("import sys\nfrom mlx_vit.cli import main\nsys.argv = ['mlx-vit', *sys.argv[1:]]\ntry:\n    main()\n"
              "except SystemExit:\n    pass\nprint(sorted({m.split('.')[0] for m in sys.modules} & set(" + repr(HEAVY) +
              ")), file=sys.stderr)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Usage" in done.stdout, done.stderr
    assert done.stderr.splitlines()[-1] == "[]", done.stderr
