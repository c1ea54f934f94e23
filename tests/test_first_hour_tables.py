"""Issue 24's first-hour points on what runs print: rates count results only, tables keep file names, and the
threshold and -o options refuse what can never be right."""

from __future__ import annotations

import io
import json
import shutil
import time

from checkpoints import PHOTOS, make_checkpoint, run_cli
from rich.cells import cell_len
from rich.console import Console

from mlx_vit.classify import Prediction, Result
from mlx_vit.runs import Stats
from mlx_vit.tables import results_table, short_path

DEEP = "/home/someone/Pictures/originals/2020/summer-trip-to-the-lake/day-3"
NAMES = ["IMG_1230.JPG", "IMG_1231.JPG", "IMG_1232.JPG"]


def printed(renderable, width: int = 80) -> list[str]:
    """The lines rich prints for `renderable` in a terminal `width` columns wide."""
    out = io.StringIO()
    Console(file=out, width=width).print(renderable)
    return out.getvalue().splitlines()


def deep_library(root):
    """Three photos whose paths differ only in their file names, each path over 100 characters."""
    folder = root / "originals-from-the-old-laptop" / "2020" / "summer-trip-to-the-lake-with-everyone" / "day-3"
    folder.mkdir(parents=True)
    for name, photo in zip(NAMES, PHOTOS, strict=False):
        shutil.copy(photo, folder / name)
    return folder


def test_a_run_whose_images_all_failed_gives_no_rate():
    stats = Stats(done=1, failed=1, started=time.monotonic() - 0.02)
    assert stats.summary() == "0 classified, 1 failed in 0.0 s"
    assert stats.rate() == 0.0


def test_the_rate_counts_only_the_images_classified():
    stats = Stats(done=5, failed=3, started=time.monotonic() - 2.0)
    summary = stats.summary("embedded")
    assert summary.startswith("2 embedded, 3 failed in 2.0 s (") and summary.endswith(" images/s)")
    assert float(summary.split("(")[1].split()[0]) == 1.0  # 2 images in 2 s; the failures are not results
    assert abs(stats.rate() - 1.0) < 0.01


def test_classify_of_a_broken_file_alone_prints_no_rate(vit_folder, tmp_path, isolated):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    done = run_cli("classify", broken, "-m", vit_folder, "--format", "jsonl", env=isolated)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("0 classified, 1 failed in ")
    assert "images/s" not in done.stderr


def test_a_threshold_above_1_is_a_usage_error_for_probabilities(vit_folder, isolated):
    done = run_cli("classify", PHOTOS[0], "-m", vit_folder, "--threshold", "1.5", env=isolated)
    assert done.returncode == 2, done.stderr
    assert "--threshold" in done.stderr and "1.5 can never match" in done.stderr
    assert run_cli("classify", PHOTOS[0], "-m", vit_folder, "--threshold", "1", env=isolated).returncode == 0


def test_a_threshold_just_above_1_is_named_as_given(vit_folder, isolated):
    # '{:g}' rounded it: '1 can never match', of a threshold 1 that can
    done = run_cli("classify", PHOTOS[0], "-m", vit_folder, "--threshold", "1.0000000000000002", env=isolated)
    assert done.returncode == 2 and "1.0000000000000002 can never match" in done.stderr, done.stderr


def test_a_regression_model_takes_a_threshold_above_1(tmp_path, isolated):
    model = make_checkpoint(tmp_path / "regression", problem_type="regression", num_labels=1)
    done = run_cli("classify", PHOTOS[0], "-m", model, "--threshold", "1.5", "--format", "jsonl", env=isolated)
    assert done.returncode == 0, done.stderr
    assert "predictions" in json.loads(done.stdout)


def test_an_output_named_for_another_format_is_a_usage_error_before_the_model_loads(tmp_path, isolated):
    out = tmp_path / "x.jsonl"
    model = tmp_path / "no-such-model"  # loading it would fail with exit code 1
    done = run_cli("classify", PHOTOS[0], "-m", model, "-o", out, "--format", "csv", env={**isolated, "COLUMNS": "300"})
    assert done.returncode == 2 and not out.exists()
    assert "the extension .jsonl names jsonl output, not csv" in done.stderr


def test_a_path_keeps_its_file_name_and_loses_its_middle():
    path = f"{DEEP}/IMG_1234.JPG"
    assert short_path(path, 200) == path
    assert short_path(path, 26) == "/home/someon…/IMG_1234.JPG"  # 26 cells exactly
    assert short_path(path, 14) == "…/IMG_1234.JPG" and short_path(path, 5) == "…/IMG_1234.JPG"  # folded then
    assert short_path("IMG_1234.JPG", 5) == "IMG_1234.JPG"
    assert cell_len(short_path("/照片/夏休み/湖畔/三日目/IMG_1.JPG", 20)) <= 20


def test_the_classify_table_keeps_every_file_name_in_80_columns():
    rows = [Result(f"{DEEP}/{name}", [Prediction("golden retriever", 0.9, 207), Prediction("tench", 0.1, 0)], None)
            for name in NAMES]  # fmt: skip
    rows.append(Result(f"{DEEP}/IMG_9999.JPG", None, "broken"))
    lines = printed(results_table(rows, "google/vit-base-patch16-224"))
    assert all(cell_len(line) <= 80 for line in lines)
    for name in [*NAMES, "IMG_9999.JPG"]:
        assert sum(f"…/{name} " in line for line in lines) == 1, "\n".join(lines)
    assert "│ /home/someone/Pict" in "\n".join(lines)  # the start of the folder stays too


def test_a_file_name_wider_than_its_column_is_folded_whole():
    name = "a-file-name-much-wider-than-any-column-an-80-column-table-can-give-it-0001.jpg"
    lines = printed(results_table([Result(f"{DEEP}/{name}", None, "broken")], "model"))
    column = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert "".join(column) == "…/" + name


def test_classify_and_its_table_file_keep_file_names_in_80_columns(vit_folder, tmp_path, isolated):
    folder = deep_library(tmp_path)
    assert all(len(str(folder / name)) > 100 for name in NAMES)
    env = {**isolated, "COLUMNS": "80"}
    done = run_cli("classify", folder, "-m", vit_folder, "-k", "1", env=env)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "table.txt"
    assert run_cli("classify", folder, "-m", vit_folder, "-k", "1", "-o", out, env=env).returncode == 0
    for text in (done.stdout, out.read_text()):
        assert all(len(line) <= 80 for line in text.splitlines())
        assert all(f"…/{name} " in text for name in NAMES), text


def test_search_keeps_file_names_in_80_columns(vit_folder, tmp_path, isolated):
    folder = deep_library(tmp_path)
    index = tmp_path / "index.safetensors"
    assert run_cli("embed", folder, "-m", vit_folder, "-o", index, env=isolated).returncode == 0
    query = folder / NAMES[0]
    done = run_cli("search", query, "--index", index, "-k", "3", env={**isolated, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    for name in NAMES:  # each photo is a match; the query is the first
        assert done.stdout.count(f"…/{name} ") == (2 if name == NAMES[0] else 1), done.stdout


def test_a_regression_models_negative_scores_are_kept_unless_a_threshold_is_given(tmp_path):
    """Without --threshold nothing is dropped: the default was 0.0, which silently dropped a regression model's
    negative scores (its raw outputs), so classify_files and the CLI printed none where classify() gave one."""
    from mlx_vit.classify import load

    classifier = load(str(make_checkpoint(tmp_path / "regression", problem_type="regression", num_labels=1)))
    photos = [str(p) for p in PHOTOS]
    expected = classifier.classify(photos, top_k=1)
    assert any(found[0].score < 0 for found in expected)  # the case that was lost
    assert [r.predictions for r in classifier.classify_files(photos, top_k=1)] == expected
    kept = [r.predictions for r in classifier.classify_files(photos, top_k=1, threshold=0.0)]
    assert kept == [[p for p in found if p.score >= 0] for found in expected]
