"""Test helpers: small timm and transformers-DINOv2 checkpoints with seeded weights, saved as each library saves them.

Every model here is tiny (width 32-48, depth 2-3) and seeded, with its weights re-drawn so that its predictions depend
on the image (as `checkpoints.make_checkpoint` does for transformers ViT/DeiT), so a converter that reads these files
without timm can be checked against timm's and transformers' own outputs on real photos:

- `make_timm(key_or_name)`: a timm model (a recipe of `VARIANTS`, or any timm name with overrides).
- `save_timm_hub` (what `push_to_hub` uploads), `save_timm_pth`, `save_timm_safetensors`, `save_npz` (an original
  JAX/Flax `.npz`, the exact inverse of timm's `_load_weights`).
- `make_dinov2(folder, kind)`: transformers' Dinov2 / Dinov2WithRegisters, saved with a facebook/dinov2-style
  preprocessor_config.json.
- Reference outputs: `timm_logits` (timm's eval transform + forward), `timm_at_size` (a model re-created at another
  resolution through timm's own checkpoint filter), `dinov2_logits` (transformers' image processor + forward).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from checkpoints import PHOTOS  # noqa: F401  (re-exported: the photos the parity tests use)

# The tiny shape every recipe starts from; a recipe's overrides, then the caller's, replace any of these.
TINY = dict(embed_dim=32, depth=2, num_heads=4, num_classes=10)

# key -> (timm model name, with its pretrained tag; the recipe's overrides on top of TINY). Native image sizes:
# at width 32 and depth 2 even DINOv2's 518 px (1369 patches) runs in well under a second on a CPU.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # plain ViT: class token, pos-embed including it, final norm, token pooling, Linear head
    "vit": ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", {}),
    # VisionTransformerDistilled: class + distillation token, head and head_dist averaged at eval
    "deit-distilled": ("deit_tiny_distilled_patch16_224.fb_in1k", {}),
    # augreg ViT-S (the in1k npz release): odd sizes on purpose, head_dim 16 with 3 heads, depth 3
    "augreg": ("vit_small_patch16_224.augreg_in1k", dict(embed_dim=48, num_heads=3, depth=3)),
    # 4 registers, no class token, no_embed_class (pos-embed over patches only), layer scale, avg pool + fc_norm
    "reg-gap": ("vit_medium_patch16_reg4_gap_256.sbb_in1k", {}),
    # class token kept but avg pool over the patch tokens, fc_norm instead of the final norm, layer scale
    "ls-fcnorm": (
        "vit_small_patch16_224.augreg_in21k_ft_in1k",
        dict(init_values=1e-5, global_pool="avg", fc_norm=True),
    ),
    # no class token, avg pool with the final norm (fc_norm False), no qkv bias, layer scale
    "gap-noqkvbias": ("vit_medium_patch16_gap_256.sw_in12k_ft_in1k", {}),
    # CLIP image tower: norm_pre after the pos-embed, no patch-embed bias, LayerNorm eps 1e-5, QuickGELU
    "clip-quickgelu": ("vit_base_patch16_clip_quickgelu_224.openai", {}),
    # SigLIP: no class token, attention pooling (MAP head: latent probe, q/kv/proj, norm, MLP)
    "siglip-map": ("vit_base_patch16_siglip_224.webli", {}),
    # DINOv2 with 4 registers at 518 px: patch 14, 37x37 grid, no_embed_class, layer scale, ImageNet mean/std
    "dinov2-reg-518": ("vit_small_patch14_reg4_dinov2.lvd142m", dict(img_size=518)),
}

# Names of the residual branches' output projections (scaled by 1/sqrt(2 * depth)) and of classifier heads.
_BRANCH_OUT = (
    "attn.proj.weight",
    "mlp.fc2.weight",
    "o_proj.weight",
    "attention.output.dense.weight",
    "mlp.weights_out.weight",
)
_HEADS = ("head.weight", "head_dist.weight", "classifier.weight")
_LAYER_SCALE = ("gamma", "lambda1")


def make_input_sensitive(model, seed: int = 0, depth: int | None = None, logit_std: float = 5.0):
    """Re-draw every parameter of a torch ViT in place (seeded) so that its output depends on the image.

    The rule of `checkpoints.make_checkpoint`, extended to every kind of parameter: Linear / Conv weights at unit
    gain (std 1/sqrt(fan_in)), the residual branches' output layers at 1/sqrt(2 * depth), classifier heads spread
    to logits of std ~logit_std; biases N(0, 0.1); LayerNorm weights U(0.6, 1.4) and biases N(0, 0.1); layer-scale
    gammas U(0.5, 1.5) (not 1e-5: the branch must matter); class / register / distillation tokens, position tables,
    attention-pool latents and mask tokens N(0, 0.5). Returns the model.
    """
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    if depth is None:
        depth = sum(1 for name, _ in model.named_parameters() if name.endswith(("norm1.weight",))) or 1
    branch_gain = (2 * depth) ** -0.5

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = module
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = owners[name]
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(owner, nn.LayerNorm):
                p.copy_(uniform(p.shape, 0.6, 1.4) if leaf == "weight" else normal(p.shape, 0.1))
            elif isinstance(owner, (nn.Linear, nn.Conv2d)):
                if leaf == "bias":
                    p.copy_(normal(p.shape, 0.1))
                    continue
                gain = logit_std if name.endswith(_HEADS) else 1.0
                gain = branch_gain if name.endswith(_BRANCH_OUT) and "attn_pool" not in name else gain
                p.copy_(normal(p.shape, gain / p[0].numel() ** 0.5))
            elif leaf in _LAYER_SCALE:
                p.copy_(uniform(p.shape, 0.5, 1.5))
            else:  # tokens, position tables, latents, mask tokens
                p.copy_(normal(p.shape, 0.5))
    return model


def calibration_pixels(size, n: int = 12, seed: int = 0):
    """`n` seeded random images in normalized-pixel space (N x 3 x H x W), roughly photo-like: an overall colour,
    blobs and some texture, within ImageNet-normalized [0, 1] pixels' range."""
    import torch
    import torch.nn.functional as F

    size = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=generator)
    mid = torch.randn(n, 3, 16, 16, generator=generator) * 0.5
    tint = torch.randn(n, 3, 1, 1, generator=generator) * 0.8
    pixels = tint + F.interpolate(low, size=size, mode="bicubic") + F.interpolate(mid, size=size, mode="bilinear")
    return pixels.clamp(-2.1, 2.6)


def center_logits(heads, logits_fn, pixels, logit_std: float = 5.0) -> None:
    """Shift and scale the Linear `heads` (whose outputs `logits_fn` averages, as a distilled DeiT's two heads) so
    that over `pixels` the logits have mean 0 and std ~logit_std per class.

    A random-weight ViT's features carry a large image-independent part (the class token, biases, position
    table), so without this one class tends to win on every photo; removing it (a non-trivial head bias, as in a
    trained classifier) leaves rankings that follow the image.
    """
    import torch

    with torch.no_grad():
        logits = logits_fn(pixels)
        scale = logit_std / max(float(logits.std(0).mean()), 1e-6)
        mean = logits.mean(0)
        for head in heads:
            head.weight.mul_(scale)
            head.bias.sub_(mean).mul_(scale)


def make_timm(name: str, seed: int = 0, logit_std: float = 5.0, **overrides):
    """A tiny seeded timm model in eval mode: `timm.create_model(name, pretrained=False, ...)`, input-sensitive.

    `name` is a key of VARIANTS (its timm name and recipe) or any timm model name (optionally `name.tag`); the
    model gets TINY, then the recipe's overrides, then `overrides`. Weights: `make_input_sensitive`, then the
    head(s) centred by `center_logits` on `calibration_pixels` (seeded, not the test photos). Since timm's factory
    records every keyword it was given (`model._model_args`), `save_timm_hub` writes them to config.json.
    """
    import timm
    import torch
    from torch import nn

    timm_name, recipe = VARIANTS.get(name, (name, {}))
    args = {**TINY, **recipe, **overrides}
    torch.manual_seed(seed)  # timm's own init draws from the global generator; make even that reproducible
    model = timm.create_model(timm_name, pretrained=False, **args).eval()
    make_input_sensitive(model, seed=seed, depth=args.get("depth"), logit_std=logit_std)
    heads = [h for h in (getattr(model, "head", None), getattr(model, "head_dist", None)) if isinstance(h, nn.Linear)]
    if heads:
        center_logits(heads, model, calibration_pixels(model.patch_embed.img_size, seed=seed), logit_std)
    return model


# -- savers -------------------------------------------------------------------------------------------------------


def save_timm_hub(model, folder: Path, safe_serialization="both", readme: bool = True, **kw) -> Path:
    """Write `folder` as timm's `push_to_hf_hub` uploads it: `save_for_hf` (config.json, model.safetensors and,
    with the default "both" that push_to_hf_hub uses, pytorch_model.bin) plus the README.md model card.

    `kw` goes to save_for_hf (model_config, model_args, data_config). timm 1.0.31's save_for_hf records the
    factory's keywords (the tiny dims, img_size as [h, w], in_chans, num_classes, global_pool) under `model_args`,
    which `timm.create_model("hf-hub:..." / "local-dir:...")` reads back as creation defaults.
    """
    from timm.models._hub import generate_readme, save_for_hf

    folder = Path(folder)
    save_for_hf(model, folder, safe_serialization=safe_serialization, **kw)
    if readme:
        config = json.loads((folder / "config.json").read_text())
        (folder / "README.md").write_text(generate_readme({}, config["architecture"]))
    return folder


def save_timm_pth(model, path: Path) -> Path:
    """A plain `torch.save(model.state_dict())` file, as timm's train.py checkpoints' weights are kept."""
    import torch

    torch.save(model.state_dict(), path)
    return Path(path)


def save_timm_safetensors(model, path: Path) -> Path:
    """The state dict as one safetensors file (timm's names, no metadata), as timm's Hub repos carry it."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def npz_arrays(model, style: str = "vit", prefix: str | None = None, scan: bool | None = None) -> dict:
    """The JAX/Flax parameter arrays of a timm VisionTransformer, the inverse of timm's `_load_weights`.

    style "vit": google-research/vision_transformer's layout (augreg release): no prefix, `cls`,
    `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/` with LayerNorm_0,
    MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3. style "big_vision" (SigLIP): prefix `params/img/`,
    `pos_embedding`, LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0, and with scan (the
    default) every block's arrays stacked on a leading layer axis under `Transformer/encoderblock/`. Kernels are
    Flax's: conv HWIO, Dense (in, out), attention query/key/value (D, heads, head_dim), out (heads, head_dim, D).
    Raises ValueError for what `_load_weights` cannot load (layer scale, fc_norm, norm_pre, registers, a
    distillation token, missing qkv / patch biases).
    """
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    if style not in ("vit", "big_vision"):
        raise ValueError(f"style must be 'vit' or 'big_vision', not {style!r}")
    big_vision = style == "big_vision"
    prefix = ("params/img/" if big_vision else "") if prefix is None else prefix
    scan = big_vision if scan is None else scan
    problems = _npz_unsupported(model)
    if problems:
        raise ValueError(f"{type(model).__name__} has what timm's _load_weights cannot load: {', '.join(problems)}")
    assert isinstance(model, VisionTransformer)

    def a(t):
        return t.detach().cpu().float().numpy().copy()

    def attention(q_weight, q_bias, kv_weights, kv_biases, proj, heads) -> dict:
        """q/k/v/out Dense-general kernels from torch Linear weights (out, in)."""
        dim = proj.weight.shape[0]
        arrays = {}
        for n, w, b in zip(("query", "key", "value"), (q_weight, *kv_weights), (q_bias, *kv_biases), strict=True):
            arrays[f"{n}/kernel"] = a(w).T.reshape(dim, heads, -1)
            arrays[f"{n}/bias"] = a(b).reshape(heads, -1)
        arrays["out/kernel"] = a(proj.weight).reshape(dim, heads, -1).transpose(1, 2, 0)
        arrays["out/bias"] = a(proj.bias)
        return arrays

    def norm(ln: nn.LayerNorm) -> dict:
        return {"scale": a(ln.weight), "bias": a(ln.bias)}

    def mlp(m) -> dict:
        return {f"Dense_{r}/{k}": v for r, fc in enumerate((m.fc1, m.fc2)) for k, v in dense(fc).items()}

    def dense(fc: nn.Linear) -> dict:
        return {"kernel": a(fc.weight).T, "bias": a(fc.bias)}

    out = {}
    out[f"{prefix}embedding/kernel"] = a(model.patch_embed.proj.weight).transpose(2, 3, 1, 0)
    out[f"{prefix}embedding/bias"] = a(model.patch_embed.proj.bias)
    if model.cls_token is not None:
        out[f"{prefix}cls"] = a(model.cls_token)
    pos_key = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    out[f"{prefix}{pos_key}"] = a(model.pos_embed)
    out.update({f"{prefix}Transformer/encoder_norm/{k}": v for k, v in norm(model.norm).items()})
    if isinstance(model.head, nn.Linear):
        out.update({f"{prefix}head/{k}": v for k, v in dense(model.head).items()})
    if isinstance(model.attn_pool, AttentionPoolLatent):
        pool = model.attn_pool
        head = f"{prefix}MAPHead_0/"
        out[f"{head}probe"] = a(pool.latent)
        k_weight, v_weight = pool.kv.weight.chunk(2)
        k_bias, v_bias = pool.kv.bias.chunk(2)
        mha = attention(pool.q.weight, pool.q.bias, (k_weight, v_weight), (k_bias, v_bias), pool.proj, pool.num_heads)
        out.update({f"{head}MultiHeadDotProductAttention_0/{k}": v for k, v in mha.items()})
        out.update({f"{head}LayerNorm_0/{k}": v for k, v in norm(pool.norm).items()})
        out.update({f"{head}MlpBlock_0/{k}": v for k, v in mlp(pool.mlp).items()})

    mha_sub, ln2_sub, mlp_sub = (0, 1, 0) if big_vision else (1, 2, 3)
    blocks = []
    for block in model.blocks:
        q_weight, k_weight, v_weight = block.attn.qkv.weight.chunk(3)
        q_bias, k_bias, v_bias = block.attn.qkv.bias.chunk(3)
        mha = attention(q_weight, q_bias, (k_weight, v_weight), (k_bias, v_bias), block.attn.proj, block.attn.num_heads)
        arrays = {f"LayerNorm_0/{k}": v for k, v in norm(block.norm1).items()}
        arrays.update({f"MultiHeadDotProductAttention_{mha_sub}/{k}": v for k, v in mha.items()})
        arrays.update({f"LayerNorm_{ln2_sub}/{k}": v for k, v in norm(block.norm2).items()})
        arrays.update({f"MlpBlock_{mlp_sub}/{k}": v for k, v in mlp(block.mlp).items()})
        blocks.append(arrays)
    if scan:
        for k in blocks[0]:
            out[f"{prefix}Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
    else:
        for i, arrays in enumerate(blocks):
            out.update({f"{prefix}Transformer/encoderblock_{i}/{k}": v for k, v in arrays.items()})
    return out


def _npz_unsupported(model) -> list[str]:
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    if not isinstance(model, VisionTransformer) or hasattr(model, "dist_token"):
        return [f"not a plain VisionTransformer ({type(model).__name__})"]
    problems = []
    if model.reg_token is not None:
        problems.append("register tokens")
    if not isinstance(model.norm_pre, nn.Identity):
        problems.append("norm_pre")
    if not isinstance(model.fc_norm, nn.Identity):
        problems.append("fc_norm")
    if not isinstance(model.norm, nn.LayerNorm):
        problems.append("no final LayerNorm")
    if model.patch_embed.proj.bias is None:
        problems.append("no patch-embed bias")
    for i, block in enumerate(model.blocks):
        if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
            problems.append(f"layer scale in block {i}")
        if block.attn.qkv.bias is None:
            problems.append(f"no qkv bias in block {i}")
        if not (isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)):
            problems.append(f"q/k norm in block {i}")
    return problems


def save_npz(model, path: Path, style: str = "vit", prefix: str | None = None, scan: bool | None = None,
             extra: dict | None = None) -> Path:  # fmt: skip
    """Write `npz_arrays(model, style, prefix, scan)` (plus `extra` arrays) as an uncompressed `.npz`, as
    `np.savez` of a flattened Flax param tree writes the original checkpoints. For style "big_vision" the SigLIP
    file's two text-tower-independent scalars `params/t` and `params/b` are added unless `extra` says otherwise.
    """
    arrays = npz_arrays(model, style=style, prefix=prefix, scan=scan)
    if style == "big_vision" and extra is None:
        extra = {"params/t": np.array([2.3], np.float32), "params/b": np.array([-10.0], np.float32)}
    arrays.update(extra or {})
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


# -- transformers DINOv2 -----------------------------------------------------------------------------------------

DINOV2_PREPROCESSOR = {  # facebook/dinov2-small's preprocessor_config.json (BitImageProcessor), verbatim
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}
DINOV2_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=518,
                    patch_size=14, layer_norm_eps=1e-6, num_labels=10)  # fmt: skip
DINOV2_KINDS = {
    "model": ("Dinov2Config", "Dinov2Model"),
    "classifier": ("Dinov2Config", "Dinov2ForImageClassification"),
    "registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
    "registers-classifier": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification"),
}


def make_dinov2(folder: Path, kind: str = "model", seed: int = 0, image_size: int = 518,
                preprocessor: dict | None = None, logit_std: float = 5.0, **config) -> Path:  # fmt: skip
    """Save a tiny transformers DINOv2 (kind: model, classifier, registers, registers-classifier) into `folder`.

    Like facebook/dinov2-small, config.json says image_size 518, so the position table holds 1 + (518 // 14)**2
    = 1370 rows (a 37x37 grid) while the preprocessor crops 224 px (a 16x16 grid): transformers interpolates the
    table at every forward (bicubic; without antialias for Dinov2, with it for Dinov2WithRegisters). Weights are
    seeded and input-sensitive (`make_input_sensitive`, classifiers centred by `center_logits`), layer-scale lambdas
    U(0.5, 1.5). `config` overrides DINOV2_SMALL.
    """
    import torch
    import transformers

    config_name, model_name = DINOV2_KINDS[kind]
    folder = Path(folder)
    values = {**DINOV2_SMALL, "image_size": image_size, **config}
    num_labels = values.pop("num_labels")
    if kind.endswith("classifier"):
        values["id2label"] = {i: f"class {i} ({'abcdefghij'[i % 10]})" for i in range(num_labels)}
    hf_config = getattr(transformers, config_name)(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(hf_config).eval()
    make_input_sensitive(model, seed=seed, depth=hf_config.num_hidden_layers, logit_std=logit_std)
    if kind.endswith("classifier"):  # centred at the preprocessor's crop, the size it runs at
        crop = (preprocessor or DINOV2_PREPROCESSOR)["crop_size"]
        pixels = calibration_pixels((crop["height"], crop["width"]), seed=seed)
        center_logits([model.classifier], lambda x: model(pixel_values=x).logits, pixels, logit_std)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor or DINOV2_PREPROCESSOR, indent=2))
    return folder


# -- reference outputs ---------------------------------------------------------------------------------------------


def _rgb(image):
    """A path -> the project's own decoding (`mlx_vit.images.open_image`: first frame, EXIF orientation, alpha
    composited on white), so that references and the converter see the same pixels; a PIL image passes as is."""
    if isinstance(image, (str, Path)):
        from mlx_vit.images import open_image

        return open_image(image)
    return image


def timm_data_config(model, data_config: dict | None = None, img_size: int | None = None) -> dict:
    """timm's eval preprocessing for `model` (input_size, interpolation, mean, std, crop_pct, crop_mode).

    `timm.data.resolve_data_config(data_config, model=model)` as timm 1.0.31's own scripts resolve it, through
    `timm.data.model_config.resolve_input_data_config`: the same answer whenever the model's pretrained_cfg matches
    it (any make_timm model, any model loaded from a saved folder), and the model's current size, not its source
    cfg's, for one re-created at another size (`timm_at_size`). `img_size` asks for a size (a fixed-size model
    refuses any but its own); lists come back as tuples.
    """
    from timm.data.model_config import resolve_input_data_config

    args = dict(data_config or {})
    if img_size is not None:
        args["input_size"] = (3, img_size, img_size)
    config = resolve_input_data_config(model, args)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def timm_logits(model, image_path, data_config: dict | None = None, img_size: int | None = None) -> np.ndarray:
    """float32 outputs of `model` (logits; pooled features when it has no head) on one image or a list of them,
    preprocessed by timm's own eval transform (`create_transform(**resolve_data_config(...))`)."""
    import torch
    from timm.data import create_transform

    transform = create_transform(**timm_data_config(model, data_config, img_size))
    many = isinstance(image_path, Sequence) and not isinstance(image_path, str)
    pixels = torch.stack([transform(_rgb(p)) for p in (image_path if many else [image_path])])
    with torch.no_grad():
        out = model.eval()(pixels).float().numpy()
    return out if many else out[0]


def timm_at_size(model, size: int):
    """`model` re-created at `size` px as timm itself does it for a checkpoint trained at another size:
    `timm.create_model(name, img_size=size, pretrained=True)` from `model`'s state dict, which timm passes through
    the architecture's checkpoint_filter_fn (pos-embed resampled by resample_abs_pos_embed, bicubic, antialias),
    with the source's model_args recorded as `pretrained_model_args` as a local-dir / hf-hub load records them.
    """
    import timm

    cfg = model.pretrained_cfg
    name = cfg["architecture"] + (f".{cfg['tag']}" if cfg.get("tag") else "")
    source_args = dict(model._model_args)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    overlay = dict(state_dict=state, num_classes=model.num_classes)
    args = {**source_args, "img_size": size}
    resized = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                                pretrained_model_args=source_args, **args)  # fmt: skip
    return resized.eval()


def dinov2_logits(folder: Path, image_path, size: int | None = None, backend: str = "torchvision",
                  hidden: bool = False) -> np.ndarray:  # fmt: skip
    """float32 outputs of the transformers DINOv2 in `folder` on one image or a list of them, preprocessed by
    `AutoImageProcessor.from_pretrained(folder, backend=backend)`: BitImageProcessor (torchvision backend, the
    transformers 5 default; the old use_fast=True) or BitImageProcessorPil (backend "pil", the old use_fast=False).

    `size`: crop size x size instead of the file's crop, the resize's shortest edge scaled with it (256/224 for
    facebook's file). Classifiers give logits, bare models the pooler output (the final-normed CLS token), or with
    `hidden` the whole last_hidden_state. transformers resamples the position table to the input's grid itself.
    """
    import torch
    import transformers

    folder = Path(folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend=backend)
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(folder).eval()
    kwargs = {}
    if size is not None:
        crop, edge = processor.crop_size["height"], processor.size["shortest_edge"]
        kwargs = dict(crop_size={"height": size, "width": size}, size={"shortest_edge": round(size * edge / crop)})
    many = isinstance(image_path, Sequence) and not isinstance(image_path, str)
    images = [_rgb(p) for p in (image_path if many else [image_path])]
    pixels = processor(images=images, return_tensors="pt", **kwargs)["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values=pixels)
    if hidden:  # a classifier's backbone (model.dinov2 / model.dinov2_with_registers) gives it
        out = output.last_hidden_state if hasattr(output, "last_hidden_state") else None
        if out is None:
            with torch.no_grad():
                out = model.base_model(pixel_values=pixels).last_hidden_state
    else:
        out = output.logits if hasattr(output, "logits") else output.pooler_output
    out = out.float().numpy()
    return out if many else out[0]
