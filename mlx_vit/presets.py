"""The `random:NAME` models: google/vit-*-patch16-224's architectures with seeded random weights, which need no
download. `bench` times them; `-m random:NAME` anywhere else tries mlx-vit offline (its predictions mean nothing).
"""

from __future__ import annotations

from mlx_vit.errors import ModelNotFoundError, shown

PREFIX = "random:"
SEED = 0
# Architectures of the google/vit-*-patch16-224 family; weights don't change the speed.
PRESETS = {
    "vit-tiny-patch16-224": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "vit-small-patch16-224": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit-base-patch16-224": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit-large-patch16-224": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def preset(name: str) -> str:
    """The preset a `random:NAME` model names; ModelNotFoundError, listing the presets, for an unknown one."""
    wanted = name.removeprefix(PREFIX)
    if wanted not in PRESETS:
        choices = ", ".join(PREFIX + p for p in PRESETS)
        raise ModelNotFoundError(f"{shown(name, 100)}: unknown preset (choose from {choices})")
    return wanted
