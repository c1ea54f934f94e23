"""`mlx-vit` end to end in subprocesses: real photo files, real checkpoint folders, a real (offline) HF cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from checkpoints import IMAGES, hf_pipeline, lay_into_hf_cache, run_cli
from PIL import Image

from mlx_vit.images import open_image

TOLERANCE = 1e-4
# Photos without transparency: transformers' pipeline drops alpha while its image processor (and mlx-vit)
# composite it on white, so RGBA files are compared through the processor path below instead.
OPAQUE = ["chelsea.png", "camera.png", "rocket.jpg", "multipage.tif"]
TRANSPARENT = ["horse.png", "logo.png", "no_time_for_that_tiny.gif"]


@pytest.fixture(scope="module")
def exif_rotated(tmp_path_factory) -> Path:
    """A real JPEG whose EXIF says 'rotate 90° clockwise to display'."""
    path = tmp_path_factory.mktemp("exif") / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(IMAGES / "rocket.jpg").save(path, exif=exif, quality=90)
    return path


def pipeline_top5(folder: Path, image) -> list[dict]:
    return hf_pipeline(folder)(image, top_k=5)


def assert_same(ours: list[dict], theirs: list[dict], label2id: dict[str, int]) -> None:
    assert [p["label"] for p in ours] == [p["label"] for p in theirs]
    assert np.abs(np.array([p["score"] for p in ours]) - [p["score"] for p in theirs]).max() < TOLERANCE
    assert [p["class_id"] for p in ours] == [label2id[p["label"]] for p in ours]


def label2id(folder: Path) -> dict[str, int]:
    return {label: int(i) for i, label in json.loads((folder / "config.json").read_text())["id2label"].items()}


def test_convert_then_classify_matches_pipeline(vit_folder, tmp_path, isolated, exif_rotated):
    out = tmp_path / "vit-mlx"
    done = run_cli("convert", vit_folder, "-o", out, env=isolated)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["format"] == "mlx-vit"
    photos = [IMAGES / name for name in OPAQUE] + [exif_rotated]
    done = run_cli("classify", *photos, "-m", out, "--format", "json", "--batch-size", "3", env=isolated)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["path"] for r in results] == [str(p) for p in photos]
    for photo, result in zip(photos, results, strict=True):
        assert_same(result["predictions"], pipeline_top5(vit_folder, str(photo)), label2id(vit_folder))


def test_transparent_images_match_the_image_processor(vit_folder, isolated):
    """RGBA and palette-transparency files: the same pixels transformers' processor makes (alpha on white)."""
    photos = [IMAGES / name for name in TRANSPARENT]
    done = run_cli("classify", *photos, "-m", vit_folder, "--format", "json", env=isolated)
    assert done.returncode == 0, done.stderr
    for photo, result in zip(photos, json.loads(done.stdout), strict=True):
        rgb = transformers.image_transforms.convert_to_rgb(Image.open(photo), return_numpy=True)
        assert np.array_equal(np.asarray(open_image(photo)), rgb)
        assert_same(result["predictions"], pipeline_top5(vit_folder, Image.fromarray(rgb)), label2id(vit_folder))


def test_distilled_deit_from_hf_folder_as_jsonl(deit_folder, isolated):
    photos = [IMAGES / "chelsea.png", IMAGES / "camera.png"]
    done = run_cli("classify", *photos, "-m", deit_folder, "--format", "jsonl", "-k", "3", env=isolated)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for photo, line in zip(photos, lines, strict=True):
        result = json.loads(line)
        assert result["path"] == str(photo)
        assert_same(result["predictions"], pipeline_top5(deit_folder, str(photo))[:3], label2id(deit_folder))


def test_broken_files_are_reported_and_the_rest_classified(vit_folder, tmp_path, isolated):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((IMAGES / "chelsea.png").read_bytes()[:5000])
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    inputs = [IMAGES / "chelsea.png", tmp_path / "missing.png", truncated, text, IMAGES / "rocket.jpg"]
    done = run_cli("classify", *inputs, "-m", vit_folder, "--format", "json", env=isolated)
    assert done.returncode == 1
    results = json.loads(done.stdout)
    assert [r["path"] for r in results] == [str(p) for p in inputs]
    assert [("predictions" in r) for r in results] == [True, False, False, False, True]
    *errors, summary = done.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in done.stderr
    assert summary.startswith("2 classified, 3 failed in ")
    for bad, line in zip(inputs[1:4], errors, strict=True):
        assert line.startswith("error: ") and str(bad) in line


def test_table_output(vit_folder, isolated):
    done = run_cli("classify", IMAGES / "chelsea.png", "-m", vit_folder, "-k", "2", env={**isolated, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    top = pipeline_top5(vit_folder, str(IMAGES / "chelsea.png"))[0]
    assert top["label"] in done.stdout and f"{top['score']:.4f}" in done.stdout


@pytest.mark.parametrize(
    "args", [["classify"], ["classify", "x.png", "-k", "0"], ["classify", "x.png", "--format", "xml"]]
)
def test_usage_errors_exit_2(args, isolated):
    assert run_cli(*args, env=isolated).returncode == 2


def test_convert_refuses_to_overwrite_without_force(vit_folder, tmp_path, isolated):
    out = tmp_path / "out"
    assert run_cli("convert", vit_folder, "-o", out, env=isolated).returncode == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    done = run_cli("convert", vit_folder, "-o", out, env=isolated)
    assert done.returncode == 1 and "already exists" in done.stderr and "--force" in done.stderr
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert run_cli("convert", vit_folder, "-o", out, "--force", env=isolated).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folders left behind


def test_default_model_from_offline_hf_cache(vit_folder, tmp_path, isolated):
    """No -m: google/vit-base-patch16-224 comes from the HF cache, is converted once, then reused."""
    snapshot = lay_into_hf_cache(vit_folder, Path(isolated["HF_HOME"]), "google/vit-base-patch16-224")
    photo = IMAGES / "chelsea.png"
    first = run_cli("classify", photo, "--format", "json", env=isolated)
    assert first.returncode == 0, first.stderr
    assert "converting google/vit-base-patch16-224" in first.stderr
    converted = Path(isolated["MLX_VIT_CACHE"]) / "google--vit-base-patch16-224" / snapshot.name
    config = json.loads((converted / "config.json").read_text())
    assert config["source"] == {"repo": "google/vit-base-patch16-224", "revision": snapshot.name}
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    second = run_cli("classify", photo, "--format", "json", env=isolated)
    assert second.returncode == 0 and "converting" not in second.stderr
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads(first.stdout) == json.loads(second.stdout)
    assert_same(json.loads(first.stdout)[0]["predictions"], pipeline_top5(vit_folder, str(photo)), label2id(vit_folder))


def test_a_converted_hub_model_loads_offline_with_the_hf_cache_cleared(vit_folder, tmp_path, isolated):
    """Converted once, the model needs neither the network nor the HF cache (the refs say which commit)."""
    lay_into_hf_cache(vit_folder, Path(isolated["HF_HOME"]), "someone/tiny-vit", commit="c" * 40)
    photo = IMAGES / "chelsea.png"
    first = run_cli("classify", photo, "-m", "someone/tiny-vit", "--format", "json", env=isolated)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(isolated["HF_HOME"])
    again = run_cli("classify", photo, "-m", "someone/tiny-vit", "--format", "json", env=isolated)
    assert again.returncode == 0, again.stderr
    assert "the Hub cannot be reached; using the copy converted from cccccccc" in again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    other = run_cli("classify", photo, "-m", "someone/tiny-vit", "--revision", "v2", env=isolated)
    assert other.returncode == 1 and "not in the Hugging Face cache" in other.stderr  # never converted at v2
    pinned = run_cli("classify", photo, "-m", "someone/tiny-vit", "--revision", "c" * 40, "--format", "json",
                     env=isolated)  # fmt: skip
    assert pinned.returncode == 0 and json.loads(pinned.stdout) == json.loads(first.stdout)


def test_convert_from_offline_hub_cache_records_revision(vit_folder, tmp_path, isolated):
    snapshot = lay_into_hf_cache(vit_folder, Path(isolated["HF_HOME"]), "someone/tiny-vit", commit="b" * 40)
    done = run_cli("convert", "someone/tiny-vit", env=isolated, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "tiny-vit-mlx" / "config.json").read_text())
    assert config["source"] == {"repo": "someone/tiny-vit", "revision": snapshot.name}


@pytest.mark.parametrize(
    "model, message",
    [
        ("google/vit-base-patch16-224", "not in the Hugging Face cache"),
        ("../x", "no such folder"),
        ("a/b/c", "no such folder"),
        ("bad name!", "not a valid Hugging Face repo id"),
    ],
)
def test_unknown_models_are_one_line_errors(model, message, isolated):
    done = run_cli("classify", IMAGES / "chelsea.png", "-m", model, env=isolated)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr, done.stderr


def test_version_names_the_blas(isolated):
    script = Path(sys.executable).with_name("mlx-vit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mlx_vit"]
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, env={**os.environ, **isolated})
    assert done.returncode == 0 and done.stdout.startswith("mlx-vit ") and "BLAS" in done.stdout
    if sys.platform.startswith("linux") and shutil.which("ldconfig"):
        libs = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        if "libopenblas.so" in libs:
            assert "OpenBLAS" in done.stdout and ", core " in done.stdout  # the kernels in use


def test_feature_extractor_and_markup_in_names(tmp_path, isolated):
    """A model without a head is one line before any output; labels and paths are shown as they are."""
    from checkpoints import make_checkpoint

    headless = make_checkpoint(tmp_path / "headless", kind="vit-model")
    done = run_cli("classify", IMAGES / "chelsea.png", "-m", headless, "--format", "json", env=isolated)
    assert done.returncode == 1 and done.stdout == "" and "no classification head" in done.stderr
    assert "Traceback" not in done.stderr

    odd = make_checkpoint(tmp_path / "odd", num_labels=2)
    config = json.loads((odd / "config.json").read_text())
    config["id2label"] = {"0": "[/bold] tabby", "1": "[red]dog"}
    (odd / "config.json").write_text(json.dumps(config))
    photo = tmp_path / "cat [edited].png"
    shutil.copy(IMAGES / "chelsea.png", photo)
    done = run_cli("classify", photo, "-m", odd, "-k", "2", env={**isolated, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "cat [edited].png" in done.stdout and "[/bold] tabby" in done.stdout and "[red]dog" in done.stdout


def test_quantization_flags_are_usage_errors(vit_folder, tmp_path, isolated):
    assert run_cli("convert", vit_folder, "-o", tmp_path / "a", "--q-bits", "8", env=isolated).returncode == 2
    assert run_cli("convert", vit_folder, "-o", tmp_path / "b", "-q", "--q-bits", "7", env=isolated).returncode == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
