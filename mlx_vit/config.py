"""A ViT's configuration (timm's VisionTransformer options under transformers' names) and the limits that keep
a hostile one from allocating or running away: checked before any module is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mlx_vit.errors import ConfigError, shown
from mlx_vit.numbers import is_number
from mlx_vit.ops import ACTIVATIONS

# Refuse configs whose weights would not fit any Mac before allocating anything (ViT-G/14 is ~1.8B parameters).
MAX_PARAMETERS = 4_000_000_000
# And configs whose activations or module count would not, at a small parameter count: 16,384 tokens is a
# 2048-pixel image at patch 16 (ViT-H/14 at 518 pixels has 1,370), and every layer is a Python object (the
# largest published ViTs have 48).
MAX_TOKENS = 16_384
MAX_LAYERS = 1_024
MAX_SIZE = 2**24  # any one size field; keeps the arithmetic below in float range
# Classes a head may have: ImageNet-21k has 21,843. Each is a label in config.json (which MAX_JSON_VALUES bounds)
# and a score per image, so a head of millions costs gigabytes for one photo.
MAX_LABELS = 2**17
MAX_REG_TOKENS = 64  # register models use 4 or 8
# Elements of the largest activation of one image (tokens x the widest layer, or the input pixels): 512 MiB in
# float32. MLX's CPU matmul indexes a batch's matrices with 32-bit offsets and crashes (SIGSEGV) or reads the
# wrong memory past 2**31 elements, and on the CPU a failed allocation is a SIGSEGV too, never an exception; so
# sizes are bounded before anything runs, and the classifier splits batches to stay within (`max_batch`).
MAX_ACTIVATION = 2**27
# Attention scores of one image over all layers (layers x heads x tokens^2), a bound on its time: each score
# costs ~17 ns on a 2-core x86 CPU, so this is ~2.5 minutes there. ViT-L/16 at 1024 pixels has 6.4e9; a
# 16k-token config with 64 heads (1.7e10) took 283 s for a single layer.
MAX_ATTENTION = 2**33


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    num_labels: int = 1000
    # DeiT: a distillation token after the class token; with `distilled_head` the logits are the mean of
    # the class-token head and the distillation-token head (DeiTForImageClassificationWithTeacher).
    distillation_token: bool = False
    distilled_head: bool = False
    # transformers' ViTPooler (dense + activation on the class token); not used for classification.
    pooler: bool = False
    pooler_act: str = "tanh"
    # timm's VisionTransformer options, by its names. The tokens are [class], [distillation], [registers], patches.
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # pos_embed covers the patches only, added before the prefix tokens are joined
    pre_norm: bool = False  # a LayerNorm after the embeddings (CLIP); the patch projection then has no bias
    global_pool: str = "token"  # see POOLS
    fc_norm: bool = False  # the final LayerNorm after pooling instead of before
    init_values: float | None = None  # layer scale (ls1/ls2) in every block where set

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config.json") -> ViTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in names})
        config.validate(source)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distillation_token) + self.reg_tokens

    @property
    def num_features(self) -> int:
        """Width of the pooled features the head reads."""
        return 2 * self.hidden_size if self.global_pool == "token_avg" else self.hidden_size

    def activation_elements(self) -> int:
        """Elements of one image's largest activation: the input pixels, or tokens x the widest layer."""
        tokens = self.num_patches + self.num_prefix_tokens
        widest = max(3 * self.hidden_size, self.intermediate_size)  # qkv, or the MLP's hidden layer
        return max(self.image_size**2 * self.num_channels, tokens * widest)

    def attention_scores(self) -> int:
        """Attention scores one image computes over all layers."""
        tokens = self.num_patches + self.num_prefix_tokens
        return self.num_hidden_layers * self.num_attention_heads * tokens**2

    def max_batch(self) -> int:
        """The most images one forward pass may take (see MAX_ACTIVATION); at least 1 for a valid config."""
        return max(1, MAX_ACTIVATION // self.activation_elements())

    def num_parameters(self) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        block = 4 * d * d + 2 * d * f + 9 * d + f
        embed = (self.patch_size**2 * self.num_channels + 1) * d + (self.num_patches + self.num_prefix_tokens) * d
        pool = 4 * d * d + 2 * d * f if self.global_pool == "map" else 0
        return L * block + embed + pool + (self.num_features + 1) * self.num_labels * 2

    def validate(self, source: str = "config.json") -> None:
        """Raise ConfigError unless every field has a usable type and size; checks only arithmetic, so it
        runs before anything is allocated."""

        def fail(message: str) -> None:
            raise ConfigError(f"{source}: {message}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                got = shown(value, 40, quote=True)
                fail(f"{name} must be a positive integer, got {got} (non-square sizes are not supported)")
            if value > MAX_SIZE:
                fail(f"{name} {shown(value, 40, quote=True)} is over the limit of {MAX_SIZE:,}")
        if not is_int(self.num_labels) or not 0 <= self.num_labels <= MAX_LABELS:
            got = shown(self.num_labels, 40, quote=True)
            fail(f"num_labels must be an integer from 0 to {MAX_LABELS:,}, got {got}")
        for name in ("qkv_bias", "distillation_token", "distilled_head", "pooler", "class_token", "no_embed_class",
                     "pre_norm", "fc_norm"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be true or false, got {shown(getattr(self, name), 40, quote=True)}")
        if self.image_size % self.patch_size:
            fail(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            fail(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            act = shown(self.hidden_act, 40, quote=True)
            fail(f"hidden_act {act} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if not isinstance(self.pooler_act, str) or (self.pooler and self.pooler_act not in ACTIVATIONS):
            fail(f"pooler_act {shown(self.pooler_act, 40, quote=True)} is not supported")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0 < eps < 1):
            fail(f"layer_norm_eps must be a small positive number, got {shown(eps, 40, quote=True)}")
        if self.distilled_head and not self.distillation_token:
            fail("a distilled head needs a distillation token")
        if not is_int(self.reg_tokens) or not 0 <= self.reg_tokens <= MAX_REG_TOKENS:
            got = shown(self.reg_tokens, 40, quote=True)
            fail(f"reg_tokens must be an integer from 0 to {MAX_REG_TOKENS}, got {got}")
        if not isinstance(self.global_pool, str) or self.global_pool not in POOLS:
            pool = shown(self.global_pool, 40, quote=True)
            fail(f"global_pool {pool} is not supported (supported: {', '.join(repr(p) for p in POOLS)})")
        if not self.class_token and (self.global_pool in ("token", "token_avg") or self.distillation_token):
            fail(f"global_pool {self.global_pool!r} and a distillation token need the class token")
        if self.global_pool == "" and self.num_labels:
            fail("a head needs pooled features: global_pool '' (no pooling) is for models without one")
        if self.distillation_token and self.reg_tokens:
            fail("a distillation token and register tokens together are not a known layout")
        init = self.init_values
        if init is not None and not is_number(init):
            fail(f"init_values must be a number or null, got {shown(init, 40, quote=True)}")
        if self.num_hidden_layers > MAX_LAYERS:
            fail(f"num_hidden_layers {self.num_hidden_layers} is over the limit of {MAX_LAYERS}")
        tokens = self.num_patches + self.num_prefix_tokens
        if tokens > MAX_TOKENS:
            fail(f"image_size {self.image_size} at patch_size {self.patch_size} makes {tokens:,} tokens "
                 f"(limit {MAX_TOKENS:,})")  # fmt: skip
        if self.activation_elements() > MAX_ACTIVATION:
            fail(f"one image's activations would hold {self.activation_elements():,} values in one tensor "
                 f"(limit {MAX_ACTIVATION:,}): too many tokens for its width")  # fmt: skip
        if self.attention_scores() > MAX_ATTENTION:
            fail(f"one image would take {self.attention_scores():,} attention scores (limit {MAX_ATTENTION:,}): "
                 "too many tokens for its heads and layers")  # fmt: skip
        if self.num_parameters() > MAX_PARAMETERS:
            fail(f"describes a model of ~{self.num_parameters() / 1e9:,.0f}B parameters; refusing to allocate it")


# timm's pooling of the final tokens into the features the head reads; "token_avg" is transformers'
# Dinov2ForImageClassification (the class token next to the mean of the patch tokens).
POOLS = ("token", "avg", "map", "", "token_avg")
