"""docs/explain.md's attention picture: `mlx-vit explain` on assets/chelsea.png with a seeded random ViT.

    python scripts/explain_example.py        # writes assets/explain-chelsea-random-weights.png

The model has google/vit-base-patch16-224's input (224 px, 16 px patches: a 14 x 14 map) but 4 small layers
of seeded random weights, made input-sensitive as in the tests, so the map shows how the picture is drawn, not
what a trained ViT looks at. Needs the test extra (transformers).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import make_checkpoint

    import mlx_vit
    from mlx_vit.explain import write_explanation

    with tempfile.TemporaryDirectory() as work:
        sizes = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=192)
        folder = make_checkpoint(Path(work) / "random-vit", seed=0, image_size=224, patch_size=16, **sizes)
        classifier = mlx_vit.load(str(folder))
        classifier.name = "random weights (seeded ViT, 224 px, 16 px patches)"
        out = ROOT / "assets" / "explain-chelsea-random-weights.png"
        write_explanation(classifier, ROOT / "assets" / "chelsea.png", out, "rollout", top_k=3, force=True)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
