"""The Vision Transformer in MLX: ViT ("An Image is Worth 16x16 Words"), DeiT, and timm's ViT family options.

Parameter names and options follow timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`, `reg_token`,
`pos_embed`, `norm_pre`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, `mlp.fc1`, `norm`, `attn_pool`, `fc_norm`,
`head`), so every checkpoint map is a short rename table. Inputs are NHWC float arrays. No I/O here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_vit.errors import ConfigError, shown

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
# Attention scores (batch x heads x queries x keys) computed at once; beyond it queries go in blocks, each
# evaluated before the next, so scores never take more than ~64 MiB however many tokens a model has.
ATTENTION_BLOCK = 2**24


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
        if self.pooler and (not isinstance(self.pooler_act, str) or self.pooler_act not in ACTIVATIONS):
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
        if init is not None and not (type(init) in (int, float) and math.isfinite(init)):
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


def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# CPU kernels. MLX's x86 CPU backend runs erf and exp one element at a time through scalar calls (~26 and ~11 ns
# an element: exact GELU alone was ~16 ms per layer per image), while a compiled chain of adds, multiplies and
# divides becomes one vectorized loop (~1 ns an element). So on the CPU, in float32, GELU and the softmax's exp
# are written with those ops only; the GPU keeps nn.gelu and the fused attention kernel. The coefficients and
# their error bounds come from scripts/fit_cpu_kernels.py.
GELU_P = (0.04986413916402573, 0.02115728879835862, 0.0032493307619688183, 5.970604563967938e-05,
          4.138809695931833e-05, 6.332420879672396e-06)  # fmt: skip
EXP2_P = (1.0000000005541694, 0.6931472057373621, 0.2402264689061661, 0.05550328776759633, 0.009618488958256325,
          0.0013399931302852607, 0.00015345811891953086)  # fmt: skip
_LOG2_E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds a float32 |t| < 2**22 to an integer


def _horner(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    # Horner's chain, not Estrin's tree: each step has one consumer, so mx.compile fuses it into one loop.
    y = coefficients[-1] * x + coefficients[-2]
    for c in coefficients[-3::-1]:
        y = y * x + c
    return y


@partial(mx.compile, shapeless=True)
def _gelu_cpu(x: mx.array) -> mx.array:
    # x * Phi(x) = relu(x) - |x| * Phi(-|x|), with Phi(-a) = 0.5 * (1 + a * P(a)) ** -16. The tail is computed
    # directly, not as 1 - erf, so nothing cancels: within 5.1e-7 of the float64 erf-GELU for every finite
    # float32 (PyTorch's float32 GELU: 1.2e-6). +-inf give NaN; a working model never feeds it one.
    a = mx.abs(x)
    base = 1.0 + a * _horner(a, GELU_P)
    for _ in range(4):
        base = base * base
    half = 0.5 * x
    return (half + mx.abs(half)) - mx.abs(half) / base


@mx.compile
def _exp_cpu(scores: mx.array, row_max: mx.array, scale: float) -> mx.array:
    # exp(scale * (scores - row_max)) as 2**t, t <= 0: 2**round(t) from the exponent bits (0 below 2**-126)
    # times a polynomial for 2**f, f in [-0.5, 0.5] (relative error 1e-7), as accurate as mx.exp.
    t = (scores - row_max) * (scale * _LOG2_E)
    n = (t + _ROUND) - _ROUND
    exponent = mx.maximum(n.astype(mx.int32) + 127, 0)
    return _horner(t - n, EXP2_P) * mx.left_shift(exponent, 23).view(mx.float32)


def _use_cpu_kernels(x: mx.array) -> bool:
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as transformers' ViT uses; on the CPU in float32 through the vectorizable form above."""
    return _gelu_cpu(x) if _use_cpu_kernels(x) else nn.gelu(x)


ACTIVATIONS = {
    "gelu": gelu,  # exact, erf-based: what transformers' ViT uses
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

    def __init__(self, patch_size: int, num_channels: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        # Weight columns are ordered (row in patch, column in patch, channel), i.e. a conv kernel in NHWC order.
        self.proj = nn.Linear(patch_size * patch_size * num_channels, hidden_size, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        p = self.patch_size
        x = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)  # (B, H/p, W/p, p, p, C)
        return self.proj(x.reshape(B, (H // p) * (W // p), p * p * C))  # (B, N, D)


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v for (B, heads, queries, head_dim) queries and (B, heads, T, head_dim) k, v."""
    if _use_cpu_kernels(q):
        # The CPU has no fused attention kernel (mx.fast's falls back to separate ops with a libm exp), so:
        # scores, the softmax's exp, the weighted sum. Dividing by the row sums after `@ v` touches
        # T * head_dim values per row instead of T * T.
        scores = q @ k.swapaxes(-1, -2)  # (B, heads, queries, T)
        weights = _exp_cpu(scores, scores.max(axis=-1, keepdims=True), scale)
        return (weights @ v) / weights.sum(axis=-1, keepdims=True)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_weights(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale), formed explicitly: the weights `attend` never shows (for `mlx-vit explain`)."""
    return mx.softmax((q @ k.swapaxes(-1, -2)) * scale, axis=-1, precise=True)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # query, key and value fused into one matmul
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).transpose(2, 0, 3, 1, 4)
        # (B, heads, T, head_dim) each; split gives views, where qkv[0] would be a gather that copies.
        return tuple(t.squeeze(0) for t in mx.split(qkv, 3))

    def __call__(self, x: mx.array) -> mx.array:
        B, T, D = x.shape
        q, k, v = self._qkv(x)
        rows = max(1, ATTENTION_BLOCK // (B * self.num_heads * T))
        if rows >= T:
            x = attend(q, k, v, self.scale)
        else:  # each query's softmax is its own: blocks of queries give exactly the same result
            blocks = []
            for start in range(0, T, rows):
                blocks.append(attend(q[:, :, start : start + rows], k, v, self.scale))
                mx.eval(blocks[-1])  # lazily, MLX would hold several blocks' scores at once
            x = mx.concatenate(blocks, axis=2)
        return self.proj(x.transpose(0, 2, 1, 3).reshape(B, T, D))

    def with_weights(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(output, the attention weights (B, heads, T, T)): the explicit softmax, which the fused kernel of
        __call__ never forms. For `mlx-vit explain`; inference never comes here."""
        B, T, D = x.shape
        q, k, v = self._qkv(x)
        weights = attention_weights(q, k, self.scale)
        return self.proj((weights @ v).transpose(0, 2, 1, 3).reshape(B, T, D)), weights


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (CaiT, DeiT III, DINOv2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each branch layer-scaled if set."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, config.num_attention_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act)
        if config.init_values:  # as timm: no layer scale for 0 or None
            self.ls1 = LayerScale(d)
            self.ls2 = LayerScale(d)

    def __call__(self, x: mx.array) -> mx.array:
        if "ls1" in self:
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def with_attention(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(this block's output, its attention weights), through Attention.with_weights."""
        out, weights = self.attn.with_weights(self.norm1(x))
        x = x + (self.ls1(out) if "ls1" in self else out)
        mlp = self.mlp(self.norm2(x))
        return x + (self.ls2(mlp) if "ls2" in self else mlp), weights


class AttentionPool(nn.Module):
    """timm's AttentionPoolLatent (SigLIP's "map" head): one learned query attends over the tokens, then an MLP."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.latent = mx.zeros((1, 1, d))
        self.q = nn.Linear(d, d)  # with biases whatever the blocks' qkv_bias, as timm builds it
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act)

    def _qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, T, D = x.shape
        h = self.num_heads
        q = self.q(self.latent).reshape(1, 1, h, D // h).transpose(0, 2, 1, 3)  # (1, heads, 1, head_dim)
        kv = self.kv(x).reshape(B, T, 2, h, D // h).transpose(2, 0, 3, 1, 4)  # (2, B, heads, T, head_dim)
        k, v = (t.squeeze(0) for t in mx.split(kv, 2))
        return mx.broadcast_to(q, (B, h, 1, D // h)), k, v

    def _out(self, x: mx.array) -> mx.array:
        B, D = x.shape[0], x.shape[1] * x.shape[3]
        x = self.proj(x.transpose(0, 2, 1, 3).reshape(B, D))  # (B, D)
        return x + self.mlp(self.norm(x))

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = self._qkv(x)
        return self._out(attend(q, k, v, (x.shape[-1] // self.num_heads) ** -0.5))

    def with_weights(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(pooled features, the latent query's attention weights over the tokens, (B, heads, 1, T))."""
        q, k, v = self._qkv(x)
        weights = attention_weights(q, k, (x.shape[-1] // self.num_heads) ** -0.5)
        return self._out(weights @ v), weights


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
        d, eps = config.hidden_size, config.layer_norm_eps
        self.patch_embed = PatchEmbed(config.patch_size, config.num_channels, d, bias=not config.pre_norm)
        if config.class_token:
            self.cls_token = mx.zeros((1, 1, d))
        if config.distillation_token:
            self.dist_token = mx.zeros((1, 1, d))
        if config.reg_tokens:
            self.reg_token = mx.zeros((1, config.reg_tokens, d))
        embedded = 0 if config.no_embed_class else config.num_prefix_tokens
        self.pos_embed = mx.zeros((1, embedded + config.num_patches, d))
        if config.pre_norm:
            self.norm_pre = nn.LayerNorm(d, eps=eps)
        self.blocks = [Block(config) for _ in range(config.num_hidden_layers)]
        if config.fc_norm:
            self.fc_norm = nn.LayerNorm(config.num_features, eps=eps)
        else:
            self.norm = nn.LayerNorm(d, eps=eps)
        if config.global_pool == "map":
            self.attn_pool = AttentionPool(config)
        if config.pooler:
            self.pooler = Pooler(d, config.pooler_act)
        if config.num_labels > 0:
            self.head = nn.Linear(config.num_features, config.num_labels)
            if config.distilled_head:
                self.head_dist = nn.Linear(d, config.num_labels)

    def forward_features(self, pixels: mx.array) -> mx.array:
        """(B, H, W, C) normalized pixels -> (B, prefix + patches, D) tokens, after the final norm unless it comes
        after pooling (fc_norm)."""
        size = self.config.image_size
        if pixels.shape[1:3] != (size, size):
            raise ValueError(f"expected {size}x{size} inputs, got {pixels.shape[1]}x{pixels.shape[2]}")
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def embed(self, pixels: mx.array) -> mx.array:
        """Pixels -> the tokens the first block reads: the prefix tokens and the patches, position-embedded."""
        x = self.patch_embed(pixels)
        B = x.shape[0]
        names = ("cls_token", "dist_token", "reg_token")
        prefix = [mx.broadcast_to(self[n], (B, *self[n].shape[1:])) for n in names if n in self]
        if self.config.no_embed_class:  # DeiT III, DINOv2 with registers, big_vision: patches only
            x = mx.concatenate([*prefix, x + self.pos_embed], axis=1)
        else:
            x = mx.concatenate([*prefix, x], axis=1) + self.pos_embed
        return self.norm_pre(x) if "norm_pre" in self else x

    def final_norm(self, x: mx.array) -> mx.array:
        return x if self.config.fc_norm else self.norm(x)

    def with_attention(self, pixels: mx.array, keep=None) -> tuple[mx.array, list, mx.array | None]:
        """(logits, every block's attention weights (B, heads, T, T), the attention pool's (B, heads, 1, patches)
        or None): the explicit-softmax path for `mlx-vit explain`. The logits equal __call__'s up to rounding.

        `keep(index, weights)` chooses what is kept of each block's weights (a reduction, or None), so that a big
        model's T x T weights of every layer and head need not all be held at once."""
        x = self.embed(pixels)
        layers = []
        for index, block in enumerate(self.blocks):
            x, weights = block.with_attention(x)
            layers.append(weights if keep is None else keep(index, weights))
        tokens = self.final_norm(x)
        pooled = pool = None
        if self.config.global_pool == "map":
            pooled, pool = self.attn_pool.with_weights(tokens[:, self.config.num_prefix_tokens :])
        return self.forward_head(tokens, pooled), layers, pool

    def pool(self, tokens: mx.array) -> mx.array:
        """(B, T, D) tokens -> (B, num_features) features, by global_pool; with no pooling the tokens themselves."""
        pool, patches = self.config.global_pool, tokens[:, self.config.num_prefix_tokens :]
        if pool == "token":
            return tokens[:, 0]
        if pool == "avg":
            return patches.mean(axis=1)
        if pool == "map":
            return self.attn_pool(patches)
        if pool == "token_avg":
            return mx.concatenate([tokens[:, 0], patches.mean(axis=1)], axis=-1)
        return tokens

    def pre_logits(self, tokens: mx.array, pooled: mx.array | None = None) -> mx.array:
        """Tokens (or their `pooled` features, when already pooled) -> what the head reads: the pooled features,
        after fc_norm when the model has one."""
        x = self.pool(tokens) if pooled is None else pooled
        return self.fc_norm(x) if self.config.fc_norm else x

    def features(self, pixels: mx.array, all_tokens: bool = False) -> mx.array:
        """Pixels -> (B, num_features) pooled features, as timm's forward_head(pre_logits=True) gives them (a
        distilled model's class and distillation tokens averaged); or every token, after the final norm."""
        tokens = self.forward_features(pixels)
        if all_tokens:
            return tokens
        x = self.pre_logits(tokens)
        return (x + tokens[:, 1]) / 2 if self.config.distillation_token and x.ndim == 2 else x

    def forward_head(self, tokens: mx.array, pooled: mx.array | None = None) -> mx.array:
        """Tokens -> logits (B, num_labels); with no head, the pooled features."""
        x = self.pre_logits(tokens, pooled)
        if self.config.num_labels == 0:
            return x
        logits = self.head(x)
        if self.config.distilled_head:
            logits = (logits + self.head_dist(tokens[:, 1])) / 2
        return logits

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.forward_head(self.forward_features(pixels))
