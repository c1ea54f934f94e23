"""Train a small ViT on scikit-learn's digits, so that quantization can be measured on trained weights.

    pip install scikit-learn           # the data: 1,797 8x8 handwritten digits that ship inside the package
    python scripts/train_digits.py     # writes tests/data/digits/ (the model and the held-out split)

A transformers ViTForImageClassification (8x8 input, 2x2 patches: 16 patches and a class token; width 64, 4
layers, 4 heads, MLP 128) is trained with PyTorch on a seeded 80/20 split and saved with `save_pretrained`, the way
a real checkpoint is, with its preprocessor config; mlx-vit converts it like any other. The held-out 20% is saved
as uint8 (`heldout.npz`: images, labels) so that tests need neither scikit-learn nor the network.

Pixels: a digit's 0..16 grey levels scaled to 0..1 (rescale_factor 1/16), normalised with mean 0.5 and std 0.5,
the grey channel repeated three times. The processor resizes to 8x8, which leaves an 8x8 digit as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "digits"
CONFIG = dict(image_size=8, patch_size=2, num_channels=3, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
PREPROCESSOR = {"do_resize": True, "size": {"height": 8, "width": 8}, "resample": 2, "do_rescale": True,
                "rescale_factor": 1 / 16,
                "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                "image_processor_type": "ViTImageProcessor"}  # fmt: skip


def pixels(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) grey levels 0..16 -> (N, 8, 8, 3) float32, as the preprocessor config above makes them."""
    x = (images.astype(np.float32) / 16 - 0.5) / 0.5
    return np.repeat(x[..., None], 3, axis=-1)


def main() -> None:
    import torch
    import transformers
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # 0..16
    train_x, test_x, train_y, test_y = train_test_split(images, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)  # fmt: skip
    torch.manual_seed(0)
    config = transformers.ViTConfig(**CONFIG, num_labels=10, id2label={i: str(i) for i in range(10)},
                                    label2id={str(i): i for i in range(10)})  # fmt: skip
    model = transformers.ViTForImageClassification(config)
    x = torch.from_numpy(pixels(train_x)).permute(0, 3, 1, 2)
    y = torch.from_numpy(train_y.astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    epochs, batch = 150, 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * -(-len(x) // batch))
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            take = order[start : start + batch]
            # A little augmentation: shift by up to one pixel.
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            inputs = torch.roll(x[take], shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(pixel_values=inputs).logits, y[take])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if epoch % 25 == 24 or epoch == epochs - 1:
            model.eval()
            with torch.no_grad():
                test = model(pixel_values=torch.from_numpy(pixels(test_x)).permute(0, 3, 1, 2)).logits
            accuracy = (test.argmax(-1).numpy() == test_y).mean()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {accuracy:.4f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(OUT / "model")
    (OUT / "model" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    np.savez_compressed(OUT / "heldout.npz", images=test_x, labels=test_y.astype(np.uint8))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
