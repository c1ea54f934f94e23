"""Issue 24's first-hour points on what runs print: rates count results only, tables keep file names, and the
threshold and -o options refuse what can never be right."""

from __future__ import annotations

import json
import time

from checkpoints import PHOTOS, make_checkpoint, run_cli

from mlx_vit.runs import Stats


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


def test_a_regression_model_takes_a_threshold_above_1(tmp_path, isolated):
    model = make_checkpoint(tmp_path / "regression", problem_type="regression", num_labels=1)
    done = run_cli("classify", PHOTOS[0], "-m", model, "--threshold", "1.5", "--format", "jsonl", env=isolated)
    assert done.returncode == 0, done.stderr
    assert "predictions" in json.loads(done.stdout)


def test_an_output_named_for_another_format_is_a_usage_error(vit_folder, tmp_path, isolated):
    out = tmp_path / "x.jsonl"
    done = run_cli("classify", PHOTOS[0], "-m", vit_folder, "-o", out, "--format", "csv", env=isolated)
    assert done.returncode == 2 and not out.exists()
    assert "names jsonl output, not csv" in " ".join(done.stderr.split())
