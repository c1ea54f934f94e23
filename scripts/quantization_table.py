"""Accuracy and size of float16 / bfloat16 / 8-bit / 4-bit conversions against the float32 transformers model.

    python scripts/quantization_table.py                      # a seeded random ViT-B/16 (no download needed)
    python scripts/quantization_table.py --model DIR_OR_REPO  # a real checkpoint you have (HF layout or Hub id)
    python scripts/quantization_table.py --digits             # the ViT trained on digits (scripts/train_digits.py)

For every photo in tests/data/images (plus its mirror image and a center crop, to have more inputs) it compares
each conversion's probabilities with the float32 transformers reference: top-1 agreement, top-5 agreement (as
the same ordered list, and as the same set), the max absolute probability difference, the folder size on disk,
and the peak memory of a fresh process that loads the model and classifies the photos in batches of 8. Prints a
Markdown table. Needs the test extra (torch, transformers). On the CPU, quantized and half models are expanded to
float32 at load time, so their peak memory is float32's; on Apple silicon they run as stored.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import mlx_vit  # noqa: E402  (loads the BLAS before anything imports mlx.core)
from mlx_vit.convert import Quantize, convert  # noqa: E402
from mlx_vit.images import open_image  # noqa: E402
from mlx_vit.preprocess import preprocess  # noqa: E402
from mlx_vit.quantize import QUANTIZED  # noqa: E402

CONFIGS = [("float32", None, "float32"), ("float16", None, "float16"), ("bfloat16", None, "bfloat16")] + [
    (f"{bits}-bit g{group}", Quantize(bits, group), "float32") for bits in (8, 4) for group in (32, 64, 128)
]
# MLX's microscaling float modes, and a mixed recipe (attention at 8 bits, the MLP at 4), as in mlx-lm.
MODES = [(mode, Quantize.of(mode=mode), "float32") for mode in ("mxfp8", "mxfp4", "nvfp4")] + [
    ("attn8_mlp4 g64", Quantize.of(recipe="attn8_mlp4"), "float32")
]
# The measurement behind quantize.QUANTIZED: the same widths with the patch embedding and head quantized too.
ALL_LINEARS = re.compile(r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])|patch_embed\.proj|head")
LAYER_CHOICE = [(f"{bits}-bit g64 + patch embedding and head", Quantize(bits, 64), "float32") for bits in (8, 4)]
# The child's own peak (VmHWM), in KiB: not ru_maxrss, which after fork and exec starts at this process's peak.
PEAK = """
import sys
import mlx_vit
from mlx_vit.bench_worker import peak_rss_mb
classifier = mlx_vit.load(sys.argv[1])
for _ in classifier.classify_files(sys.argv[2:], top_k=5, batch_size=8):
    pass
print(int(peak_rss_mb() * 1024))
"""


def photos(workdir: Path) -> list[Path]:
    paths = []
    for path in sorted((ROOT / "tests" / "data" / "images").glob("*.*")):
        if path.suffix not in (".png", ".jpg", ".tif", ".gif"):
            continue
        image = open_image(path)
        variants = {"": image, "-mirror": ImageOps.mirror(image), "-crop": ImageOps.fit(image, (image.width // 2,) * 2)}
        for suffix, variant in variants.items():
            paths.append(workdir / f"{path.stem}{suffix}.png")
            variant.save(paths[-1])
    return paths


def reference_probabilities(hf_folder: Path, inputs: list[Path]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForImageClassification.from_pretrained(hf_folder).eval()
    loaded = mlx_vit.load(str(hf_folder))  # same preprocessing as transformers' (tested to 1e-5)
    pixels = np.stack([preprocess(open_image(p), loaded.preprocessing) for p in inputs])
    with torch.no_grad():
        logits = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    return np.exp(logits - logits.max(-1, keepdims=True)) / np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True
    )


def random_vit_base(folder: Path) -> Path:
    from checkpoints import make_checkpoint

    return make_checkpoint(folder, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000)  # fmt: skip


def digits_table(work: Path) -> None:
    """Trained weights: each conversion of tests/data/digits/model on its 360 held-out digits, against mlx-vit's
    float32 conversion (top-1 agreement) and the labels (accuracy)."""
    from test_trained_quantization import DIGITS, pixels

    data = np.load(DIGITS / "heldout.npz")
    inputs, labels = pixels(data["images"]), data["labels"]
    print(f"{len(labels)} held-out digits; reference: mlx-vit's float32 conversion of {DIGITS / 'model'}\n")
    print("| model | top-1 agreement with float32 | held-out accuracy | size (MB) |\n|---|---|---|---|")
    reference = None
    for name, quantize, dtype in CONFIGS + MODES:
        if quantize is not None and quantize.group_size > 64:
            continue  # the model is 64 wide: a group of 128 would leave every layer in float
        out = convert(str(DIGITS / "model"), work / re.sub(r"\W+", "-", name), quantize=quantize, dtype=dtype)
        predictions = mlx_vit.load(str(out)).logits(inputs).argmax(-1)
        reference = predictions if reference is None else reference
        size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
        print(f"| {name} | {(predictions == reference).mean():.1%} | {(predictions == labels).mean():.1%} "
              f"| {size:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF-layout folder or Hub id (default: a seeded random ViT-B/16)")
    parser.add_argument("--digits", action="store_true", help="the ViT trained on digits, on its held-out split")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of Markdown")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlx-vit-quant-"))
    if args.digits:
        digits_table(work)
        return
    if args.model and not Path(args.model).is_dir():
        from mlx_vit.hub import download

        hf_folder = download(args.model)
    else:
        hf_folder = Path(args.model) if args.model else random_vit_base(work / "hf")
    inputs = photos(work)
    reference = reference_probabilities(hf_folder, inputs)
    ref_top5 = np.argsort(-reference, axis=-1, kind="stable")[:, :5]
    rows = []
    for name, quantize, dtype in CONFIGS + MODES + LAYER_CHOICE:
        mlx_vit.quantize.QUANTIZED = ALL_LINEARS if "head" in name else QUANTIZED
        out = convert(str(hf_folder), work / re.sub(r"\W+", "-", name), quantize=quantize, dtype=dtype)
        classifier = mlx_vit.load(str(out))
        probs = classifier.scores(classifier.logits(classifier.pixels(inputs)))
        top5 = np.argsort(-probs, axis=-1, kind="stable")[:, :5]
        peak = subprocess.run([sys.executable, "-c", PEAK, str(out), *map(str, inputs)], capture_output=True,
                              text=True, check=True).stdout.split()[-1]  # fmt: skip
        rows.append({
            "model": name,
            "top5_set_agreement": float(np.mean([set(a) == set(b) for a, b in zip(top5, ref_top5, strict=True)])),
            "top1_agreement": float((top5[:, 0] == ref_top5[:, 0]).mean()),
            "top5_agreement": float((top5 == ref_top5).all(axis=1).mean()),
            "max_prob_diff": float(np.abs(probs - reference).max()),
            "size_mb": sum(p.stat().st_size for p in out.iterdir()) / 1e6,
            "peak_rss_mb": int(peak) / 1024,
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{len(inputs)} inputs; reference: float32 transformers on {args.model or 'a seeded random ViT-B/16'}\n")
    print("| model | top-1 agreement | top-5 agreement (ordered) | top-5 agreement (as a set) | max prob. diff "
          "| size (MB) | peak memory (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['top1_agreement']:.0%} | {r['top5_agreement']:.0%} | {r['top5_set_agreement']:.0%} "
              f"| {r['max_prob_diff']:.4f} "
              f"| {r['size_mb']:.1f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
