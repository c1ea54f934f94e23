"""A newcomer's first hour (issue 24): a slow BLAS is said once, with its fix, before a run of more than a few images,
and the README's set-up and test commands are the ones CI runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import IMAGES
from typer.testing import CliRunner

from mlx_vit import blas
from mlx_vit.blas import INSTALL_HINT, BlasInfo
from mlx_vit.cli import app
from mlx_vit.runs import FEW_IMAGES

ROOT = Path(__file__).parent.parent
runner = CliRunner()

REFERENCE = BlasInfo("reference (bundled with mlx)", None, f"slow: {INSTALL_HINT}", fix=INSTALL_HINT)
WRONG_CORE = BlasInfo(
    "OpenBLAS 0.3.21",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "core Prescott looks wrong for this AVX-512 CPU (SkylakeX would be faster; it could not be chosen)",
    core="Prescott",
    fix="run with OPENBLAS_CORETYPE=SkylakeX, or install a newer OpenBLAS",
)
FAST = BlasInfo("OpenBLAS 0.3.21", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "", "SkylakeX")
CHOSEN = BlasInfo("reference (bundled with mlx)", None, "MLX_VIT_BLAS=none")  # the user's own choice: no fix


@pytest.fixture
def blas_is(monkeypatch, tmp_path, vit_folder):
    """Fake this process's BLAS, with nothing warned yet; gives a function that runs a CLI command on N photos."""
    monkeypatch.setattr(blas, "_warned", False)
    monkeypatch.delenv("MLX_VIT_QUIET", raising=False)
    monkeypatch.setenv("MLX_VIT_CACHE", str(tmp_path / "cache"))

    def run(info: BlasInfo, count: int, command: str = "classify"):
        monkeypatch.setattr(blas, "blas_info", lambda: info)
        photos = tmp_path / f"photos-{count}"
        photos.mkdir(exist_ok=True)
        for i in range(count):
            shutil.copy(IMAGES / "chelsea.png", photos / f"{i:02}.png")
        output = tmp_path / f"{command}-{count}-{len(list(tmp_path.iterdir()))}"
        output = output.with_suffix(".npy" if command == "embed" else ".jsonl")
        result = runner.invoke(app, [command, str(photos), "-m", str(vit_folder), "-o", str(output)])
        assert result.exit_code == 0, result.output
        return result.stderr

    return run


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "slow BLAS" in line]


def test_the_reference_blas_is_said_once_with_how_to_install_openblas(blas_is):
    (said,) = warnings(blas_is(REFERENCE, FEW_IMAGES + 1))
    assert said.startswith("mlx-vit: slow BLAS (MLX's bundled reference BLAS")
    assert "apt install libopenblas0-pthread" in said and "pip install mkl" in said and "MLX_VIT_QUIET=1" in said
    assert warnings(blas_is(REFERENCE, FEW_IMAGES + 1)) == []  # once a process


def test_an_openblas_core_below_the_cpus_is_said_with_the_core_to_use(blas_is):
    (said,) = warnings(blas_is(WRONG_CORE, FEW_IMAGES + 1, "embed"))
    assert "core Prescott looks wrong" in said and "run with OPENBLAS_CORETYPE=SkylakeX" in said


def test_a_few_images_a_fast_blas_or_the_users_own_choice_say_nothing(blas_is):
    assert warnings(blas_is(REFERENCE, FEW_IMAGES)) == []
    assert warnings(blas_is(FAST, FEW_IMAGES + 1)) == []
    assert warnings(blas_is(CHOSEN, FEW_IMAGES + 1)) == []


def test_mlx_vit_quiet_silences_it(blas_is, monkeypatch):
    monkeypatch.setenv("MLX_VIT_QUIET", "1")
    assert warnings(blas_is(REFERENCE, FEW_IMAGES + 1)) == []
    monkeypatch.setenv("MLX_VIT_QUIET", "0")
    assert len(warnings(blas_is(REFERENCE, FEW_IMAGES + 1))) == 1


def test_this_machines_blas_gets_a_fix_only_when_it_is_slow_and_not_chosen():
    info = blas.load_blas()
    chosen = info.note == "MLX_VIT_BLAS=none" or "OPENBLAS_CORETYPE is set" in info.note
    slow = info.path is None or "looks wrong" in info.note
    assert bool(info.fix) == (slow and not chosen), info


def test_a_users_own_openblas_coretype_is_said_by_version_and_not_warned_about():
    script = "from mlx_vit.blas import load_blas\ninfo = load_blas()\nprint(info.core, info.note, info.fix, sep='|')"
    env = {**os.environ, "OPENBLAS_CORETYPE": "Prescott"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    core, note, fix = done.stdout.strip().split("|")
    if core in ("None", "") or "looks wrong" not in note:
        pytest.skip(f"no DYNAMIC_ARCH OpenBLAS beneath a CPU past SSE here ({done.stdout.strip()})")
    assert "OPENBLAS_CORETYPE is set" in note and fix == ""


README = (ROOT / "README.md").read_text()


def blocks(text: str, kind: str) -> list[list[str]]:
    """The lines of each ```kind fenced block in `text`."""
    return [body.strip("\n").splitlines() for body in re.findall(rf"^```{kind}\n(.*?)^```$", text, re.M | re.S)]


def test_the_readme_is_short_and_its_first_command_shows_its_output():
    assert len(README.splitlines()) < 260
    first = blocks(README, "console")[0]
    assert first[0].startswith("$ mlx-vit classify") and not first[1].startswith("$") and len(first) > 5


def test_the_readme_installs_the_app_first_with_the_linux_blas_and_ci_runs_its_test_command():
    setup = blocks(README, "bash")[0]
    assert setup[0].endswith("pip install -e .") and "apt install libopenblas0-pthread" in setup[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# The README's test command, verbatim:") + 1]
    tests = next(block for block in blocks(README, "bash") if command in block)
    assert "pip install -e '.[test]'" in tests and "python -m pip install -q -e '.[test]'" in ci
    cpu_torch = tests[0].split("#")[0].split()  # the pins of the CPU-only torch are the test extra's
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in ("torch==", "torchvision=="):
        assert f'"{next(word for word in cpu_torch if word.startswith(pin))}"' in pyproject


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings."""
    titles = [line.lstrip("#").strip().lower() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", title).replace(" ", "-") for title in titles}


def test_every_link_between_the_readme_and_the_docs_leads_somewhere():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 10
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            assert not anchor or anchor in anchors(linked), f"{page.name}: {target}"


def rows(lines: list[str]) -> list[tuple[int, float, int]]:
    """(rank, score, class id) of each prediction row in a printed table."""
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    return [(int(c[1]), float(c[3]), int(c[4])) for c in cells if c[1]]


def test_the_quick_starts_print_what_the_readme_shows(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MLX_VIT_CACHE", str(tmp_path / "cache"))
    first, library = blocks(README, "console")[:2]
    shown = runner.invoke(app, first[0].removeprefix("$ mlx-vit ").split() + ["--format", "json"])
    assert shown.exit_code == 0, shown.output
    (result,) = json.loads(shown.stdout)
    table = rows(first)
    assert [c for _, _, c in table] == [p["class_id"] for p in result["predictions"]]
    assert [s for _, s, _ in table] == pytest.approx([p["score"] for p in result["predictions"]], abs=1e-4)
    assert first[1] in shown.stderr  # the line saying the weights are random
    command = library[0].removeprefix("$ mlx-vit ").replace("labels.jsonl", str(tmp_path / "labels.jsonl"))
    assert runner.invoke(app, command.split()).exit_code == 0
    readme_line = json.loads(library[library.index("$ head -n 1 labels.jsonl") + 1])
    ours = json.loads((tmp_path / "labels.jsonl").read_text().splitlines()[0])
    assert ours["path"] == readme_line["path"]
    assert [(p["label"], p["class_id"]) for p in ours["predictions"]] == [
        (p["label"], p["class_id"]) for p in readme_line["predictions"]
    ]
    assert [p["score"] for p in ours["predictions"]] == pytest.approx(
        [p["score"] for p in readme_line["predictions"]], abs=1e-5
    )
