"""A conversion killed or failing at any moment leaves either nothing or a complete model at the target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_checkpoint

from mlx_vit.config import ViTConfig
from mlx_vit.convert import FolderConfig, convert, write_mlx_folder
from mlx_vit.errors import MlxVitError
from mlx_vit.loading import load_model
from mlx_vit.preprocess import PreprocessConfig

A_CONFIG = FolderConfig(ViTConfig(), PreprocessConfig())  # any config: these tests are about the files


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """Big enough (~40 MB) that a conversion spends real time writing."""
    return make_checkpoint(tmp_path_factory.mktemp("medium"), hidden_size=384, num_attention_heads=6,
                           intermediate_size=1536, num_hidden_layers=6, image_size=64, patch_size=16)  # fmt: skip


def assert_absent_or_complete(target, reference_logits):
    if not target.exists():
        return False
    model = load_model(str(target)).model
    x = mx.array(np.ones((1, 64, 64, 3), np.float32))
    assert np.array_equal(np.array(model(x)), reference_logits)
    return True


def test_sigkill_at_any_moment(medium, tmp_path):
    reference = np.array(load_model(str(medium)).model(mx.array(np.ones((1, 64, 64, 3), np.float32))))
    target = tmp_path / "out"
    command = [sys.executable, "-m", "mlx_vit", "convert", str(medium), "-o", str(target), "--force"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, env=env)
    duration = time.monotonic() - start
    outcomes = set()
    for fraction in (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcomes.add(assert_absent_or_complete(target, reference))
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
        assert all(name.startswith((".out.tmp-", ".out.old-")) for name in leftovers), leftovers
    assert outcomes == {True}  # the first full run left a model there; every kill kept a complete one
    done = subprocess.run(command, capture_output=True, env=env)
    assert done.returncode == 0 and assert_absent_or_complete(target, reference)


def test_killed_first_conversion_leaves_nothing_that_looks_like_a_model(medium, tmp_path):
    target = tmp_path / "fresh"
    command = [sys.executable, "-m", "mlx_vit", "convert", str(medium), "-o", str(target)]
    for delay in (0.5, 1.0, 1.5, 2.0, 2.5):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if target.exists():  # the kill came after the rename: then it must be whole
            load_model(str(target))
            break
    # A rerun is never blocked by temporary leftovers.
    assert subprocess.run([*command, "--force"], env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode == 0
    load_model(str(target))


def test_failure_after_the_first_file(tmp_path, monkeypatch, vit_folder):
    """An error while writing config.json, after the weights were written: nothing at the target."""
    from mlx_vit.convert import mlx_folder

    original = mlx_folder.write_new

    def failing_write(path, *args, **kwargs):
        if path.name == "config.json":
            raise OSError(28, "No space left on device")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(mlx_folder, "write_new", failing_write)
    with pytest.raises(MlxVitError, match="No space"):
        convert(str(vit_folder), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_detected(vit_folder, tmp_path):
    out = convert(str(vit_folder), tmp_path / "out")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MlxVitError, match="incomplete"):
        load_model(str(out))


def test_manifest_records_hashes_and_source(vit_folder, tmp_path):
    import hashlib

    out = convert(str(vit_folder), tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("config.json", "model.safetensors"):
        data = (out / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["source"] == {"path": str(vit_folder.resolve())}


def test_stale_temporary_folders_are_cleaned_up(tmp_path):
    stale = tmp_path / ".model.tmp-deadbeef"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200,) * 2)
    fresh = tmp_path / ".model.tmp-cafecafe"  # perhaps another conversion running right now: left alone
    fresh.mkdir()
    write_mlx_folder(tmp_path / "model", {"w": np.zeros(2, np.float32)}, A_CONFIG, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-cafecafe", "model"]
