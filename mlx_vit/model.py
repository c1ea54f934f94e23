"""The Vision Transformer in MLX: ViT ("An Image is Worth 16x16 Words"), DeiT, and timm's ViT family options.

Parameter names and options follow timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`, `reg_token`,
`pos_embed`, `norm_pre`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, `mlp.fc1`, `norm`, `attn_pool`, `fc_norm`,
`head`), so every checkpoint map is a short rename table. Inputs are NHWC float arrays. No I/O here.
"""

from __future__ import annotations

import weakref

import mlx.core as mx
import mlx.nn as nn

from mlx_vit import lanes, ops
from mlx_vit.config import ViTConfig

# Attention scores (batch x heads x queries x keys) computed at once; beyond it queries go in blocks, each
# evaluated before the next, so scores never take more than ~64 MiB however many tokens a model has.
ATTENTION_BLOCK = 2**24


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
    if ops.use_cpu_kernels(q):
        # The CPU has no fused attention kernel (mx.fast's falls back to separate ops with a libm exp), so:
        # scores, the softmax's exp, the weighted sum. Dividing by the row sums after `@ v` touches
        # T * head_dim values per row instead of T * T.
        scores = q @ k.swapaxes(-1, -2)  # (B, heads, queries, T)
        weights = ops.softmax_exp(scores, scores.max(axis=-1, keepdims=True), scale)
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

    def __call__(self, x: mx.array, share: Share | None = None) -> mx.array:
        """The attention's output; with a lane's `share`, its heads' part of it (before proj's bias)."""
        if share is None:
            return self.proj(self.mix(*self._qkv(x)))
        B, T, D = x.shape
        a, b = share.columns
        q, k, v = (_rows(self.qkv, i * D + a, i * D + b, x).reshape(B, T, -1, D // self.num_heads)
                   .transpose(0, 2, 1, 3) for i in range(3))  # fmt: skip
        return self.mix(q, k, v) @ share.proj.T

    def mix(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """(B, heads, queries, head_dim) queries over (B, heads, T, head_dim) keys and values -> (B, queries,
        heads * head_dim), the heads side by side: what `proj` reads."""
        B, _, queries, _ = q.shape
        rows = max(1, ATTENTION_BLOCK // (B * q.shape[1] * k.shape[2]))
        if rows >= queries:
            x = attend(q, k, v, self.scale)
        else:  # each query's softmax is its own: blocks of queries give exactly the same result
            blocks = []
            for start in range(0, queries, rows):
                blocks.append(attend(q[:, :, start : start + rows], k, v, self.scale))
                mx.eval(blocks[-1])  # lazily, MLX would hold several blocks' scores at once
            x = mx.concatenate(blocks, axis=2)
        return x.transpose(0, 2, 1, 3).reshape(B, queries, -1)

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
        self.act = ops.ACTIVATIONS[act]

    def __call__(self, x: mx.array, share: Share | None = None) -> mx.array:
        """The MLP's output; with a lane's `share`, its hidden units' part of it (before fc2's bias)."""
        if share is None:
            return self.fc2(self.act(self.fc1(x)))
        return self.act(_rows(self.fc1, *share.hidden, x)) @ share.fc2.T


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
        for branch, residual in self.stages():
            x = residual(x, branch(x))
        return x

    def stages(self) -> tuple:
        """The block as its two residual stages, each (branch, residual): `branch(x)` is the stage's output, and
        `residual(x, output)` adds it to x. With a lane's share, `branch(x, share)` is that share's part of the
        output, and `residual(x, sum of the parts, split=True)` adds them up (mlx_vit.lanes)."""
        return (self.attention_branch, self.attention_residual), (self.mlp_branch, self.mlp_residual)

    def attention_branch(self, x: mx.array, share: Share | None = None) -> mx.array:
        return self.attn(self.norm1(x), share)

    def mlp_branch(self, x: mx.array, share: Share | None = None) -> mx.array:
        return self.mlp(self.norm2(x), share)

    def attention_residual(self, x: mx.array, out: mx.array, split: bool = False) -> mx.array:
        out = out + self.attn.proj.bias if split else out
        return x + (self.ls1(out) if "ls1" in self else out)

    def mlp_residual(self, x: mx.array, out: mx.array, split: bool = False) -> mx.array:
        out = out + self.mlp.fc2.bias if split else out
        return x + (self.ls2(out) if "ls2" in self else out)

    def with_attention(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(this block's output, its attention weights), through Attention.with_weights."""
        out, weights = self.attn.with_weights(self.norm1(x))
        x = self.attention_residual(x, out)
        return self.mlp_residual(x, self.mlp_branch(x)), weights

    @property
    def width(self) -> int:
        return self.norm1.weight.shape[0]

    @property
    def attention_heads(self) -> int:
        return self.attn.num_heads

    @property
    def hidden_units(self) -> int:
        return self.mlp.fc1.weight.shape[0]

    def splits(self, count: int) -> bool:
        """Whether the block can be run as `count` shares: a head for each at least, and float32 layers that are
        plain Linears (in half precision the shares' parts would be rounded before they are added)."""
        layers = (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2)
        plain = all(type(layer) is nn.Linear and layer.weight.dtype == mx.float32 for layer in layers)
        return plain and self.attention_heads >= count

    def shares(self, heads: list[tuple[int, int]], hidden: list[tuple[int, int]]) -> list[Share]:
        """The block cut into shares, one for each (heads, hidden units) pair of ranges."""
        return [Share(self, h, u) for h, u in zip(heads, hidden, strict=True)]


class Share:
    """A lane's share of a block (mlx_vit.lanes): some of its heads and some of its MLP's hidden units. Their rows
    of qkv and fc1 are read in place, as views; their columns of proj and fc2 are copied (BLAS cannot read a
    column slice), once. `fits` tells whether the block still has the weights they were copied from: one
    replaced (update, load_weights, set_dtype, quantize) makes a share stale; one edited in place (`w[:] = ...`)
    does not: call lanes.forget then."""

    def __init__(self, block: Block, heads: tuple[int, int], hidden: tuple[int, int]):  # head and unit ranges
        head = block.width // block.attention_heads
        self.columns = (heads[0] * head, heads[1] * head)  # the heads' channels: rows of q, k, v; columns of proj
        self.hidden = hidden
        # Not evaluated here: the pass evaluates them, also under mx.compile, where weights are placeholders.
        self.proj = mx.contiguous(block.attn.proj.weight[:, self.columns[0] : self.columns[1]])
        self.fc2 = mx.contiguous(block.mlp.fc2.weight[:, hidden[0] : hidden[1]])
        self._sources = [weakref.ref(layer.weight) for layer in (block.attn.proj, block.mlp.fc2)]

    def fits(self, block: Block) -> bool:
        now = (block.attn.proj.weight, block.mlp.fc2.weight)
        return all(source() is weight for source, weight in zip(self._sources, now, strict=True))


def _rows(layer: nn.Linear, start: int, stop: int, x: mx.array) -> mx.array:
    """x through the output units start:stop of a Linear: a row slice of its weight, which BLAS reads in place."""
    out = x @ layer.weight[start:stop].T
    return out + layer.bias[start:stop] if "bias" in layer else out


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
        self.act = ops.ACTIVATIONS[act]

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
        return self.final_norm(self.run_blocks(self.embed(pixels)))

    def run_blocks(self, x: mx.array) -> mx.array:
        """The blocks on (B, T, D) tokens; on the CPU in lanes (mlx_vit.lanes), unless the attention scores are
        too many to form at once (ATTENTION_BLOCK) and go in blocks, evaluated one after another."""
        B, T, _ = x.shape
        fits = B * self.config.num_attention_heads * T * T <= ATTENTION_BLOCK
        return lanes.run(self.blocks, x, lanes.streams() if fits else [])

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
        lanes.use(1)
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
