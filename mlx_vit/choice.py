"""Which model, and how: the one value a command hands the library to load a classifier, and the defaults.

Imports nothing heavy, so that `mlx-vit --help` can show the defaults without loading mlx, PIL or
huggingface_hub; mlx_vit.loading and mlx_vit.images take their defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlx_vit.classify import Classifier

DEFAULT_MODEL = "google/vit-base-patch16-224"
# Images of more pixels are refused before they are decoded (--max-pixels raises it). Every model here looks at
# 224-518 px, so a larger image costs only time and memory: decoding peaks at ~8.5 bytes a pixel for JPEG and
# PNG and ~16.5 for WebP (Pillow's decoder holds three canvases), ~1.1 GB and ~2.1 GB at this limit
# (tests/test_images.py bounds them). It is above every camera's photo (100 MP medium format is 102 MP,
# phones 12-48 MP, their panoramas up to ~65 MP) and below Pillow's bomb threshold of 178,956,970 pixels.
DEFAULT_MAX_PIXELS = 128_000_000


@dataclass(frozen=True)
class ModelChoice:
    """A model name (folder, weight file or Hub repo id) and how to load it: `revision` on the Hub,
    `max_pixels` for the images it opens, `image_size` to run it at, `arch` naming a bare weight file."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_size: int | None = None
    arch: str | None = None

    def load(self) -> Classifier:
        """The classifier this names, as mlx_vit.load makes it."""
        from mlx_vit.classify import load

        return load(model=self.model, revision=self.revision, max_pixels=self.max_pixels,
                    image_size=self.image_size, arch=self.arch)  # fmt: skip
