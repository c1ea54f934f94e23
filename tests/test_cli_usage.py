"""Exit codes by one rule: 2 when the command line is wrong whatever the disk holds (options that do not go
together), said before any model loads; 1 when an input, an output file or the library refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mlx_vit.choice import ModelChoice
from mlx_vit.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "300"}


pytestmark = pytest.mark.usefixtures("restored_logging")


@pytest.fixture
def no_model(monkeypatch):
    """A usage error is said before any model loads."""

    def load(choice):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ModelChoice, "load", load)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--resume"], "--resume needs -o FILE"),
        (["--resume", "--format", "json", "-o", "{tmp}/out.json"], "--resume continues jsonl or csv output, not json"),
        (["--resume", "-o", "{tmp}/out.json"], "--resume continues jsonl or csv output, not json"),
        (["--resume", "--format", "table"], "--resume needs -o FILE"),
    ],
    ids=["no -o", "--format json", "-o .json", "table"],
)
def test_resume_with_options_it_does_not_go_with_is_a_usage_error(args, says, tmp_path, no_model):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["classify", "x.png", *args], env=WIDE)
    assert result.exit_code == 2, result.output
    assert says in result.stderr and "Usage: " in result.stderr
    assert not list(tmp_path.iterdir())


def test_an_existing_output_without_resume_is_refused_by_the_library(tmp_path, monkeypatch):
    """What the disk holds is the library's to refuse: exit 1 and its one line, the file untouched."""
    from types import SimpleNamespace

    model = SimpleNamespace(name="tiny", regression=False, check_classifies=lambda: None,
                            model_config=SimpleNamespace(num_labels=2))  # fmt: skip
    monkeypatch.setattr(ModelChoice, "load", lambda choice: model)
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    result = runner.invoke(app, ["classify", "x.png", "-o", str(out)], env=WIDE)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == f"error: {out}: already exists; --resume continues it, or remove it first"
    assert out.read_text() == "precious\n"


@pytest.mark.parametrize("name, kind", [("model.pth", "a bare weight file"), ("ViT-B_16.npz", "a JAX .npz")])
def test_a_bare_weight_file_without_arch_says_so_before_its_output_folder(name, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(b"not read: --arch is missing")
    target = tmp_path / (name.rsplit(".", 1)[0] + "-mlx")
    target.mkdir()  # it exists: that is not what to say first
    result = runner.invoke(app, ["convert", name], env=WIDE)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (f"error: {name}: {kind} names no architecture; pass --arch TIMM_NAME[.TAG] "
                                     "(for example --arch vit_base_patch16_224.augreg2_in21k_ft_in1k)")  # fmt: skip
    assert not list(target.iterdir())


def test_a_bare_weight_file_with_an_unknown_arch_says_so_before_its_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pth").write_bytes(b"not read")
    (tmp_path / "model-mlx").mkdir()
    result = runner.invoke(app, ["convert", "model.pth", "--arch", "vit_nonexistent_patch16_224"], env=WIDE)
    assert result.exit_code == 1 and "vit_nonexistent_patch16_224" in result.stderr, result.output
    assert "already exists" not in result.stderr


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_resume_of_an_output_holding_failures_exits_1_as_its_first_run(vit_folder, tmp_path, suffix):
    """A failure is that image's result: a resume skips it, does not retry it, and the output still holds it, so
    the resume exits 1 as the run that wrote it did, and says so in its summary."""
    from checkpoints import PHOTOS

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / f"labels.{suffix}"
    args = ["classify", str(PHOTOS[0]), str(broken), "-m", str(vit_folder), "-o", str(out)]
    first = runner.invoke(app, args, env=WIDE)
    assert first.exit_code == 1 and out.exists()
    written = out.read_bytes()
    again = runner.invoke(app, [*args, "--resume"], env=WIDE)
    assert again.exit_code == 1, again.output
    assert "2 skipped (already in the output), 1 failed before (in the output, not retried)" in again.output
    assert out.read_bytes() == written
    out.write_bytes(b"".join(line for line in written.splitlines(keepends=True) if b"broken" not in line))
    assert runner.invoke(app, [*args[:2], *args[3:], "--resume"], env=WIDE).exit_code == 0  # no failure left
