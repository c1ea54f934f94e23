"""Test helpers: small transformers checkpoints with seeded random weights, real photos, an HF cache, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_vit.errors import shown

IMAGES = Path(__file__).parent / "data" / "images"
PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg", ".tif", ".gif"))

VIT_PREPROCESSOR = {  # google/vit-base-patch16-224's legacy file, verbatim
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 224,
}
DEIT_PREPROCESSOR = {  # facebook/deit-*-distilled-patch16-224's legacy file, at a small size
    "crop_size": 32,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "DeiTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 36,
}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
             patch_size=8, num_labels=10)  # fmt: skip


def make_checkpoint(folder: Path, kind: str = "vit", seed: int = 0, preprocessor: dict | None = None,
                    safe_serialization: bool = True, max_shard_size: str | None = None, logit_std: float = 5,
                    **config) -> Path:  # fmt: skip
    """Save a transformers model with seeded random weights (made input-sensitive) into `folder`."""
    import json

    import torch
    import transformers

    torch.manual_seed(seed)
    values = {**SMALL, **config}
    num_labels = values.pop("num_labels")
    id2label = {i: f"class {i} ({'abcdefghij'[i % 10]})" for i in range(num_labels)}
    if kind.startswith("deit"):
        hf_config = transformers.DeiTConfig(**values, id2label=id2label)
        cls = {
            "deit": transformers.DeiTForImageClassification,
            "deit-teacher": transformers.DeiTForImageClassificationWithTeacher,
            "deit-model": transformers.DeiTModel,
        }[kind]
    else:
        hf_config = transformers.ViTConfig(**values, id2label=id2label)
        cls = {"vit": transformers.ViTForImageClassification, "vit-model": transformers.ViTModel}[kind]
    model = cls(hf_config).eval()
    # transformers' init (std 0.02) gives a model whose output hardly depends on the image, and nearly uniform
    # class scores. Re-draw the weights at unit gain (std 1/sqrt(fan_in)) so every photo gets its own
    # prediction, with the residual branches' output layers scaled by 1/sqrt(2 * layers) (as GPT-2 does) so
    # depth stays stable rather than chaotic, as in trained models; spread the logits to a std of ~logit_std
    # (trained classifiers' are ~5), so rankings are stable and top-5 comparisons mean something.
    generator = torch.Generator().manual_seed(seed)
    branch_gain = (2 * hf_config.num_hidden_layers) ** -0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                gain = logit_std if "classifier" in name else 1.0
                gain = branch_gain if name.endswith(("o_proj.weight", "fc2.weight")) else gain
                p.copy_(torch.randn(p.shape, generator=generator) * gain / fan_in**0.5)
            elif name.endswith("cls_token") or name.endswith("position_embeddings"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if not safe_serialization:  # transformers 5 writes only safetensors; a Hub pytorch_model.bin looks like this
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if preprocessor is None:
        preprocessor = {**VIT_PREPROCESSOR, "size": values["image_size"]}
        if kind.startswith("deit"):
            preprocessor = {**DEIT_PREPROCESSOR, "crop_size": values["image_size"], "size": values["image_size"] + 4}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def hf_pipeline(folder: Path):
    """transformers' image-classification pipeline with the PIL image processor, the one mlx-vit reproduces.

    (With torchvision installed, transformers 5 picks its torchvision-backed processor, whose resize differs.)
    """
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    return transformers.pipeline("image-classification", model=str(folder), image_processor=processor, device="cpu")


def lay_into_hf_cache(folder: Path, hf_home: Path, repo_id: str, commit: str = "a" * 40) -> Path:
    """Place an HF-layout folder into a Hugging Face cache exactly where the Hub client looks for it."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run_cli(*args, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`mlx-vit ARGS...` in a subprocess, its environment updated with `env`."""
    return subprocess.run([sys.executable, "-m", "mlx_vit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)  # fmt: skip


def one_line_error(kind, call, *args, names: Path | str | None = None, **kwargs) -> str:
    """call(*args) raises `kind` with a message of one line, naming `names`, without a control character."""
    with pytest.raises(kind) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in message), repr(message)
    if names is not None:  # as messages show a path: a long one keeps its start and end
        assert shown(names) in message, message
    return message


_PEAK = """
import atexit, sys

def _peak_mb():
    # Linux: VmHWM, this process's own high-water mark. Not ru_maxrss, which after fork and exec starts at the
    # parent's peak (the kernel carries it over): under pytest every child would seem to take pytest's memory.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        import resource  # macOS has no /proc: ru_maxrss, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

atexit.register(lambda: sys.stderr.write(f"\\nPEAK {_peak_mb():.0f}\\n"))
"""


def peak_mb(code: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run Python `code` in a fresh interpreter; (its result, its peak resident memory in MB)."""
    done = subprocess.run([sys.executable, "-c", _PEAK + code], capture_output=True, text=True, timeout=timeout)
    peak = float(done.stderr.rsplit("PEAK ", 1)[1].split()[0])
    return done, peak
