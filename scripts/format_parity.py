"""Print how far mlx-vit is from each checkpoint's own reference, for every format (a measurement, not a test).

    python scripts/format_parity.py [--seed 0]

Builds the seeded checkpoints tests/test_formats.py uses (tests/timm_checkpoints.py), converts each one and prints
the largest logit difference from timm or transformers over the repo's photos, and whether the top-5 ids agree.
Needs the test extra (torch, timm, transformers).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import timm_checkpoints as tc  # noqa: E402
from checkpoints import PHOTOS  # noqa: E402

from mlx_vit.classify import load  # noqa: E402

SMALL = ("test_vit.r160_in1k", dict(embed_dim=64, depth=6, num_heads=2, img_size=160, mlp_ratio=3))


def cases(seed: int, scratch: Path):
    """(name, how mlx-vit loads it, the reference's logits on PHOTOS)."""
    for key in tc.VARIANTS:
        model = tc.make_timm(key, seed=seed)
        folder = tc.save_timm_hub(model, scratch / key)
        yield f"timm Hub folder: {key}", (str(folder), {}), tc.timm_logits(model, PHOTOS)
    model = tc.make_timm("vit", seed=seed)
    at384 = tc.timm_logits(tc.timm_at_size(model, 384), PHOTOS, img_size=384)
    yield "timm Hub folder at --image-size 384", (str(scratch / "vit"), {"image_size": 384}), at384
    small = tc.make_timm(SMALL[0], seed=seed, **SMALL[1])
    reference = tc.timm_logits(small, PHOTOS)
    path = tc.save_timm_pth(small, scratch / "w.pth")
    yield "bare .pth --arch test_vit", (str(path), {"arch": "test_vit"}), reference
    for style in ("vit", "big_vision"):
        path = tc.save_npz(small, scratch / f"{style}.npz", style=style)
        yield f"JAX .npz ({style}) --arch test_vit", (str(path), {"arch": "test_vit"}), reference
    for kind in ("classifier", "registers-classifier"):
        folder = tc.make_dinov2(scratch / kind, kind=kind, seed=seed)
        for size in (None, 518):
            reference = tc.dinov2_logits(folder, PHOTOS, size=size, backend="pil")
            yield f"transformers DINOv2 {kind} at {size or 224}", (str(folder), {"image_size": size}), reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        print(f"{'checkpoint':48} {'max |logit diff|':>17} {'top-5 ids':>10}")
        for name, (model, options), reference in cases(args.seed, Path(scratch)):
            classifier = load(model, **options)
            ours = classifier.logits(classifier.pixels(PHOTOS))
            same = all(
                (np.argsort(-a, kind="stable")[:5] == np.argsort(-b, kind="stable")[:5]).all()
                for a, b in zip(ours, reference, strict=True)
            )
            print(f"{name:48} {np.abs(ours - reference).max():17.1e} {'equal' if same else 'DIFFER':>10}")


if __name__ == "__main__":
    main()
