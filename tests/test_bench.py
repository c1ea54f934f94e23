"""`mlx-vit bench`: its report's fields and numbers, from a real run on a tiny model. Timings are not asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from checkpoints import make_checkpoint

from mlx_vit.bench import parse_batch_sizes

MLX_VIT = [sys.executable, "-m", "mlx_vit"]


def bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MLX_VIT, "bench", *args], capture_output=True, text=True, env=env, timeout=300)


def test_json_report_against_torch(tmp_path):
    folder = make_checkpoint(tmp_path / "vit")
    done = bench("-m", str(folder), "--batch-sizes", "2,1", "--runs", "2", "--warmup", "0", "--compare", "torch",
                 "--format", "json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == str(folder) and report["dtype"] == "float32"
    assert set(report["runtimes"]) == {"mlx-vit", "torch"}
    assert "OpenBLAS" in report["runtimes"]["mlx-vit"]["blas"] or sys.platform != "linux"
    # Same weights, same input: the logits agree as in the parity tests.
    assert report["max_abs_logit_diff"]["torch"] < 1e-4
    rows = {(r["runtime"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(runtime, batch) for runtime in ("mlx-vit", "torch") for batch in (1, 2)}
    for (_, batch), row in rows.items():
        assert row["runs"] == 2
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p95"]
        assert math.isclose(row["images_per_s"], batch / row["latency_ms_p50"] * 1000)
        assert row["peak_memory_mb"] > 10


@pytest.mark.parametrize("kind", ["timm-map", "npz", "dinov2"])
def test_reference_for_every_format(kind, tmp_path):
    """timm models against timm (an .npz through _load_weights), DINOv2 at its 224 crop against transformers."""
    pytest.importorskip("timm")
    import timm_checkpoints as tc

    from mlx_vit.convert import convert

    if kind == "timm-map":
        model = str(tc.save_timm_hub(tc.make_timm("siglip-map"), tmp_path / "hub"))
    elif kind == "npz":
        small = tc.make_timm("test_vit.r160_in1k", embed_dim=64, depth=6, num_heads=2, img_size=160, mlp_ratio=3)
        model = str(convert(str(tc.save_npz(small, tmp_path / "w.npz")), tmp_path / "out", arch="test_vit"))
    else:
        model = str(tc.make_dinov2(tmp_path / "dinov2", kind="registers-classifier"))
    done = bench("-m", model, "--batch-sizes", "1", "--runs", "1", "--warmup", "0", "--compare", "torch",
                 "--format", "json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["max_abs_logit_diff"]["torch"] < 1e-4
    assert report["runtimes"]["torch"]["same_weights"]


def test_errors_are_one_line(tmp_path):
    done = bench("-m", "random:vit-huge-patch99")
    assert done.returncode == 1 and done.stderr.startswith("error: random:vit-huge-patch99: unknown preset")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = bench("-m", "google/vit-base-patch16-224", "--compare", "none", env=env)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "not in the Hugging Face cache" in done.stderr
    done = bench("--batch-sizes", "8,x")
    assert done.returncode == 2 and "give positive integers" in done.stderr


@pytest.mark.parametrize("text, sizes", [("1,8,32", [1, 8, 32]), ("8, 1,8", [1, 8]), ("4", [4])])
def test_parse_batch_sizes(text, sizes):
    assert parse_batch_sizes(text) == sizes


@pytest.mark.parametrize("text", ["", "0", "1,-2", "a", "1.5"])
def test_parse_batch_sizes_refuses(text):
    with pytest.raises(ValueError):
        parse_batch_sizes(text)
