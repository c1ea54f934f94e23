"""The ViT paper's JAX/Flax `.npz` files (ViT-B_16.npz, the augreg files, big_vision's): named with --arch.

The names are those timm's `_load_weights` reads: `embedding/kernel` (an HWIO convolution), `cls`,
`Transformer/posembed_input/pos_embedding` (big_vision: `pos_embedding`), `Transformer/encoderblock_N/...`
(big_vision may stack all blocks in one `Transformer/encoderblock/...` with the layer first), `MAPHead_0/...`,
`head/kernel`. The layout fix transposes kernels to (out, in) and joins the per-head query/key/value kernels
into one qkv matrix. Arrays are read with allow_pickle=False: an object array is refused, never unpickled.
"""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np

from mlx_vit.config import ViTConfig
from mlx_vit.errors import CheckpointError, shown
from mlx_vit.files import npy_header, open_regular

from . import timm_vit
from .common import JAX_RESAMPLE, Checkpoint, Source, check_finite, weight_budget
from .safetensors_io import check_budget
from .torch_pickle import ARCHIVE_ERRORS, MAX_INFLATION
from .zip_archive import check_archive

NAME = "JAX .npz"
LOOKS_FOR = {"file": "an .npz with --arch"}  # by source kind
PREFIXES = ("", "opt/target/", "params/", "params/img/")
IGNORED = ("pre_logits/",)  # the old representation layer, which timm drops too


def detect(source: Source) -> bool:
    return not source.is_folder and source.path.suffix == ".npz"


def read_npz(path, budget: int | None = None) -> dict[str, np.ndarray]:
    """Every float array of an .npz, each member's header checked before its data is read; the members at most
    `budget` bytes together."""
    name = shown(path)
    arrays: dict[str, np.ndarray] = {}
    with open_regular(path, CheckpointError) as file:
        size = file.seek(0, io.SEEK_END)
        try:
            with zipfile.ZipFile(file) as archive:
                check_archive(file, archive, size, name)
                if sum(info.file_size for info in archive.infolist()) > MAX_INFLATION * size:
                    raise CheckpointError(f"{name}: its arrays would be over {MAX_INFLATION}x the file's size")
                check_budget(sum(info.file_size for info in archive.infolist()), budget, name)
                names = set(archive.namelist())
                for info in archive.infolist():
                    key = info.filename.removesuffix(".npy")
                    # `cls` and `cls.npy`, or `w.npy` and `w.npy.npy`: numpy reads one under both keys, this loop
                    # each under one.
                    if key in arrays or (key != info.filename and key in names):
                        raise CheckpointError(f"{name}: the archive holds array '{shown(key, 80)}' twice")
                    with archive.open(info) as member:
                        arrays[key] = _read_array(member, info.file_size, f"{name}: array '{shown(key, 80)}'")
        except ARCHIVE_ERRORS as error:
            reason = shown(f"{type(error).__name__}: {error}", 200)
            raise CheckpointError(f"{name}: not a readable .npz archive ({reason})") from None
    return arrays


def _read_array(member, size: int, name: str) -> np.ndarray:
    """One .npy member: its header (bounded by numpy) checked, then exactly the bytes it declares."""
    shape, fortran, dtype = npy_header(member, name, CheckpointError)
    if dtype.hasobject:
        raise CheckpointError(f"{name} holds Python objects (refused: loading them would run pickle)")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        hint = " (bfloat16 as raw bytes? re-save it as float32)" if dtype.kind == "V" else ""
        raise CheckpointError(f"{name} is {dtype}, not a float16, float32 or float64 array{hint}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > size:
        raise CheckpointError(f"{name}: its header declares more data than the archive member holds")
    data = member.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"{name}: truncated ({len(data)} of {nbytes} bytes)")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(dtype.newbyteorder("="), copy=False)  # big-endian files too


class _Names:
    """The archive's arrays under its prefix, each taken once and shape-checked."""

    def __init__(self, arrays: dict[str, np.ndarray], prefix: str, source: str, depth: int):
        self.arrays, self.prefix, self.source, self.taken = arrays, prefix, source, set()
        self.depth = depth  # blocks stacked in one array have this many rows

    def has(self, key: str) -> bool:
        return self.prefix + key in self.arrays

    def take(self, key: str, shape: tuple[int, ...], index: int | None = None) -> np.ndarray:
        full = self.prefix + key
        if full not in self.arrays:
            raise CheckpointError(f"{self.source}: has no array '{shown(full, 80)}', which --arch's model needs")
        self.taken.add(full)
        value = self.arrays[full]
        if index is not None:  # big_vision's stacked blocks: the layer first
            if value.ndim == 0 or value.shape[0] != self.depth:
                raise CheckpointError(f"{self.source}: array '{shown(full, 80)}' has shape {value.shape}, not one "
                                      f"row per block")  # fmt: skip
            value = value[index]
        if value.shape != shape:
            raise CheckpointError(f"{self.source}: array '{shown(full, 80)}' has shape {value.shape}, the "
                                  f"architecture makes {shape}")  # fmt: skip
        return value

    def unused(self) -> list[str]:
        return [k for k in self.arrays if k.startswith(self.prefix) and k not in self.taken
                and not k[len(self.prefix):].startswith(IGNORED)]  # fmt: skip


def _attention(w: _Names, at: str, d: int, heads: int, parts: tuple[str, ...], index) -> tuple[np.ndarray, ...]:
    """Flax per-head (D, heads, head_dim) kernels -> one (len(parts) * D, D) matrix and its bias."""
    kernels = [w.take(f"{at}{p}/kernel", (d, heads, d // heads), index).reshape(d, d).T for p in parts]
    biases = [w.take(f"{at}{p}/bias", (heads, d // heads), index).reshape(d) for p in parts]
    return np.concatenate(kernels), np.concatenate(biases)


def map_weights(w: _Names, config: ViTConfig, big_vision: bool) -> dict[str, np.ndarray]:
    """The layout fix: Flax kernels (in, out) -> (out, in); HWIO patches -> (D, p*p*C) over NHWC patches."""
    d, f, p, c, h = (config.hidden_size, config.intermediate_size, config.patch_size, config.num_channels,
                     config.num_attention_heads)  # fmt: skip
    out = {
        "patch_embed.proj.weight": w.take("embedding/kernel", (p, p, c, d)).transpose(3, 0, 1, 2).reshape(d, -1),
        "patch_embed.proj.bias": w.take("embedding/bias", (d,)),
    }
    if config.class_token:
        out["cls_token"] = w.take("cls", (1, 1, d))
    tokens = config.num_patches + (0 if config.no_embed_class else config.num_prefix_tokens)
    out["pos_embed"] = w.take("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding",
                              (1, tokens, d))  # fmt: skip
    out["norm.weight"] = w.take("Transformer/encoder_norm/scale", (d,))
    out["norm.bias"] = w.take("Transformer/encoder_norm/bias", (d,))
    if config.num_labels:
        out["head.weight"] = w.take("head/kernel", (d, config.num_labels)).T
        out["head.bias"] = w.take("head/bias", (config.num_labels,))
    if config.global_pool == "map":
        at = "MAPHead_0/"
        out["attn_pool.latent"] = w.take(f"{at}probe", (1, 1, d))
        mha = f"{at}MultiHeadDotProductAttention_0/"
        out["attn_pool.q.weight"], out["attn_pool.q.bias"] = _attention(w, mha, d, h, ("query",), None)
        out["attn_pool.kv.weight"], out["attn_pool.kv.bias"] = _attention(w, mha, d, h, ("key", "value"), None)
        out["attn_pool.proj.weight"] = w.take(f"{mha}out/kernel", (h, d // h, d)).reshape(d, d).T
        out["attn_pool.proj.bias"] = w.take(f"{mha}out/bias", (d,))
        _layer_norm_mlp(w, out, at, "LayerNorm_0", "MlpBlock_0", "attn_pool.norm", "attn_pool.mlp", d, f, None)
    stacked = w.has("Transformer/encoderblock/LayerNorm_0/scale")
    mha_sub, mlp_sub, ln2_sub = (0, 0, 1) if big_vision else (1, 3, 2)
    for i in range(config.num_hidden_layers):
        at, index = ("Transformer/encoderblock/", i) if stacked else (f"Transformer/encoderblock_{i}/", None)
        mha, block = f"{at}MultiHeadDotProductAttention_{mha_sub}/", f"blocks.{i}."
        out[f"{block}norm1.weight"] = w.take(f"{at}LayerNorm_0/scale", (d,), index)
        out[f"{block}norm1.bias"] = w.take(f"{at}LayerNorm_0/bias", (d,), index)
        out[f"{block}attn.qkv.weight"], out[f"{block}attn.qkv.bias"] = _attention(
            w, mha, d, h, ("query", "key", "value"), index
        )
        out[f"{block}attn.proj.weight"] = w.take(f"{mha}out/kernel", (h, d // h, d), index).reshape(d, d).T
        out[f"{block}attn.proj.bias"] = w.take(f"{mha}out/bias", (d,), index)
        _layer_norm_mlp(w, out, at, f"LayerNorm_{ln2_sub}", f"MlpBlock_{mlp_sub}", f"{block}norm2", f"{block}mlp",
                        d, f, index)  # fmt: skip
    return {key: np.ascontiguousarray(value) for key, value in out.items()}


def _layer_norm_mlp(w: _Names, out: dict, at: str, ln: str, mlp: str, norm: str, fc: str, d: int, f: int, index):
    out[f"{norm}.weight"] = w.take(f"{at}{ln}/scale", (d,), index)
    out[f"{norm}.bias"] = w.take(f"{at}{ln}/bias", (d,), index)
    out[f"{fc}.fc1.weight"] = w.take(f"{at}{mlp}/Dense_0/kernel", (d, f), index).T
    out[f"{fc}.fc1.bias"] = w.take(f"{at}{mlp}/Dense_0/bias", (f,), index)
    out[f"{fc}.fc2.weight"] = w.take(f"{at}{mlp}/Dense_1/kernel", (f, d), index).T
    out[f"{fc}.fc2.bias"] = w.take(f"{at}{mlp}/Dense_1/bias", (d,), index)


def read(source: Source) -> Checkpoint:
    name, pretrained, cls, kwargs = timm_vit.bare_architecture(source, "a JAX .npz")
    arrays = read_npz(source.path, weight_budget(timm_vit.vit_config(cls, kwargs, 0, source.name)))
    check_finite(arrays, source.name)
    prefix = next((p for p in PREFIXES if p + "embedding/kernel" in arrays), None)
    if prefix is None:
        raise CheckpointError(f"{source.name}: has no embedding/kernel; not a ViT .npz checkpoint")
    big_vision = prefix.startswith("params/") or prefix + "pos_embedding" in arrays
    big_vision = big_vision or prefix + "Transformer/encoderblock/LayerNorm_0/scale" in arrays
    head = arrays.get(prefix + "head/bias")
    if head is not None and head.ndim != 1:
        raise CheckpointError(f"{source.name}: array 'head/bias' has shape {head.shape}, expected 1 dimension")
    config = timm_vit.vit_config(cls, kwargs, 0 if head is None else int(head.shape[0]), source.name)
    if config.fc_norm:  # _load_weights loads encoder_norm into `norm` only: which the file means is a guess
        raise CheckpointError(f"{source.name}: {name} normalizes after pooling (fc_norm), which timm does not load "
                              "from an .npz")  # fmt: skip
    names = _Names(arrays, prefix, source.name, config.num_hidden_layers)
    weights = map_weights(names, config, big_vision)
    if names.unused():
        raise CheckpointError(f"{source.name}: array '{shown(names.unused()[0], 80)}' is not one a "
                              f"{name} reads")  # fmt: skip
    return timm_vit.checkpoint(name, config, weights, pretrained, JAX_RESAMPLE, source.name)
