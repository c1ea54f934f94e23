"""The Vision Transformer in MLX: ViT ("An Image is Worth 16x16 Words") and DeiT.

Parameter names follow timm's ViT (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, `mlp.fc1`,
`norm`, `head`), so every checkpoint map is a short rename table. Inputs are NHWC float arrays. No I/O here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_vit.errors import ConfigError

# Refuse configs whose weights would not fit any Mac before allocating anything (ViT-G/14 is ~1.8B parameters).
MAX_PARAMETERS = 4_000_000_000


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
        return 2 if self.distillation_token else 1

    def num_parameters(self) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        block = 4 * d * d + 2 * d * f + 9 * d + f
        embed = (self.patch_size**2 * self.num_channels + 1) * d + (self.num_patches + 2) * d
        return L * block + embed + (d + 1) * self.num_labels * 2

    def validate(self, source: str = "config.json") -> None:
        def fail(message: str) -> None:
            raise ConfigError(f"{source}: {message}")

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
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r} (non-square sizes are not supported)")
        if not isinstance(self.num_labels, int) or self.num_labels < 0:
            fail(f"num_labels must be a non-negative integer, got {self.num_labels!r}")
        if self.image_size % self.patch_size:
            fail(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            fail(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            fail(f"hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if self.pooler and self.pooler_act not in ACTIVATIONS:
            fail(f"pooler_act {self.pooler_act!r} is not supported")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            fail(f"layer_norm_eps must be a small positive number, got {self.layer_norm_eps!r}")
        if self.distilled_head and not self.distillation_token:
            fail("a distilled head needs a distillation token")
        if self.num_parameters() > MAX_PARAMETERS:
            fail(f"describes a model of ~{self.num_parameters() / 1e9:.0f}B parameters; refusing to allocate it")


def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
    "gelu": nn.gelu,  # exact, erf-based: what transformers' ViT uses
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": mx.tanh,
}


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. A stride-p conv is a matmul over flattened patches, so we do that."""

    def __init__(self, patch_size: int, num_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        # Weight columns are ordered (row in patch, column in patch, channel), i.e. a conv kernel in NHWC order.
        self.proj = nn.Linear(patch_size * patch_size * num_channels, hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        p = self.patch_size
        x = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)  # (B, H/p, W/p, p, p, C)
        return self.proj(x.reshape(B, (H // p) * (W // p), p * p * C))  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # query, key and value fused into one matmul
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, head_dim)
        x = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(0, 2, 1, 3).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, config.num_attention_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Pooler(nn.Module):
    def __init__(self, dim: int, act: str):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, cls_token: mx.array) -> mx.array:
        return self.act(self.fc(cls_token))


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embed = PatchEmbed(config.patch_size, config.num_channels, d)
        self.cls_token = mx.zeros((1, 1, d))
        if config.distillation_token:
            self.dist_token = mx.zeros((1, 1, d))
        self.pos_embed = mx.zeros((1, config.num_prefix_tokens + config.num_patches, d))
        self.blocks = [Block(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        if config.pooler:
            self.pooler = Pooler(d, config.pooler_act)
        if config.num_labels > 0:
            self.head = nn.Linear(d, config.num_labels)
            if config.distilled_head:
                self.head_dist = nn.Linear(d, config.num_labels)

    def forward_features(self, pixels: mx.array) -> mx.array:
        """(B, H, W, C) normalized pixels -> (B, prefix + patches, D) tokens after the final norm."""
        size = self.config.image_size
        if pixels.shape[1:3] != (size, size):
            raise ValueError(f"expected {size}x{size} inputs, got {pixels.shape[1]}x{pixels.shape[2]}")
        x = self.patch_embed(pixels)
        B = x.shape[0]
        prefix = [self.cls_token] + ([self.dist_token] if self.config.distillation_token else [])
        prefix = [mx.broadcast_to(t, (B, 1, t.shape[-1])) for t in prefix]
        x = mx.concatenate([*prefix, x], axis=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, tokens: mx.array) -> mx.array:
        """Tokens -> logits (B, num_labels); with no head, the class token's features."""
        if self.config.num_labels == 0:
            return tokens[:, 0]
        logits = self.head(tokens[:, 0])
        if self.config.distilled_head:
            logits = (logits + self.head_dist(tokens[:, 1])) / 2
        return logits

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.forward_head(self.forward_features(pixels))
