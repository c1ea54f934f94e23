"""mlx_vit.convert.pos_embed against torch's F.interpolate, timm's resample_abs_pos_embed and transformers'
ViT / DeiT / DINOv2 `interpolate_pos_encoding`."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_vit.convert.pos_embed import resample_grid, resample_pos_embed

torch = pytest.importorskip("torch")
F = torch.nn.functional

COMBOS = [("bicubic", False), ("bicubic", True), ("bilinear", False), ("bilinear", True)]
# (old H, W) -> (new h, w): down, up, odd, far up, non-square, 1x1 both ways, one axis unchanged
SIZES = [
    ((37, 37), (16, 16)),
    ((14, 14), (24, 24)),
    ((7, 7), (5, 5)),
    ((4, 4), (37, 37)),
    ((16, 16), (15, 15)),
    ((14, 14), (12, 20)),
    ((10, 6), (3, 17)),
    ((14, 14), (14, 9)),
    ((1, 1), (3, 2)),
    ((5, 3), (1, 1)),
    ((24, 24), (7, 7)),
]
# torch computes source coordinates and weights in float32: against its float64 result it is off by up to ~6e-6
# on N(0, 1) values (e.g. 16 -> 15), where this float64 implementation is off by the final float32 rounding only.
ATOL_F32, ATOL_F64 = 1e-5, 5e-7


def _torch_resample(grid: np.ndarray, size, mode: str, antialias: bool, dtype=torch.float32) -> np.ndarray:
    x = torch.from_numpy(grid).to(dtype).permute(2, 0, 1)[None]  # (1, D, H, W)
    y = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)
    return y[0].permute(1, 2, 0).double().numpy()  # (h, w, D)


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b).max())


@pytest.mark.parametrize("mode,antialias", COMBOS)
def test_resample_grid_matches_torch(mode, antialias):
    rng = np.random.default_rng(0)
    worst32 = worst64 = 0.0
    for (H, W), size in SIZES:
        grid = rng.standard_normal((H, W, 8)).astype(np.float32)
        out = resample_grid(grid, size, mode, antialias)
        assert out.dtype == np.float32 and out.shape == (*size, 8)
        worst32 = max(worst32, _max_err(out, _torch_resample(grid, size, mode, antialias)))
        worst64 = max(worst64, _max_err(out, _torch_resample(grid, size, mode, antialias, torch.float64)))
    assert worst32 < ATOL_F32, f"{mode} antialias={antialias}: max error {worst32:.2e} against torch float32"
    assert worst64 < ATOL_F64, f"{mode} antialias={antialias}: max error {worst64:.2e} against torch float64"


@pytest.mark.parametrize("mode,antialias", COMBOS)
def test_same_size_is_identity(mode, antialias):
    grid = np.random.default_rng(1).standard_normal((6, 9, 4)).astype(np.float32)
    np.testing.assert_allclose(resample_grid(grid, (6, 9), mode, antialias), grid, atol=1e-6)
    pos = np.random.default_rng(1).standard_normal((1, 1 + 36, 4)).astype(np.float32)
    assert resample_pos_embed(pos, (6, 6), 1, mode, antialias) is pos


def test_aa_differs_from_plain():
    """For bicubic the antialiased path is another resampler both ways (A=-0.5, PIL borders), so a lost flag shows."""
    grid = np.random.default_rng(2).standard_normal((14, 14, 8)).astype(np.float32)
    for size in [(7, 7), (24, 24)]:
        plain, aa = (resample_grid(grid, size, "bicubic", a) for a in (False, True))
        assert _max_err(plain, aa) > 1e-2


@pytest.mark.parametrize("mode,antialias", COMBOS)
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_matches_timm(prefix, mode, antialias):
    timm_pos_embed = pytest.importorskip("timm.layers.pos_embed")
    rng = np.random.default_rng(prefix)
    cases = [((14, 14), (24, 24), None), ((14, 14), (10, 7), None), ((6, 10), (8, 8), (6, 10))]
    for (H, W), (h, w), old in cases:
        pos = rng.standard_normal((1, prefix + H * W, 8)).astype(np.float32)
        ours = resample_pos_embed(pos, (h, w), prefix, mode, antialias, old_grid=old)
        ref = timm_pos_embed.resample_abs_pos_embed(
            torch.from_numpy(pos),
            new_size=[h, w],
            old_size=None if old is None else list(old),
            num_prefix_tokens=prefix,
            interpolation=mode,
            antialias=antialias,
        ).numpy()
        assert ours.shape == (1, prefix + h * w, 8) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours[:, :prefix], pos[:, :prefix])
        err = _max_err(ours, ref.astype(np.float64))
        assert err < ATOL_F32, f"{(H, W)} -> {(h, w)}, prefix {prefix}: max error {err:.2e} against timm"


def _check_transformers(embeddings, prefix: int, patch: int, dim: int):
    rng = np.random.default_rng(3)
    pos = rng.standard_normal(tuple(embeddings.position_embeddings.shape)).astype(np.float32)
    with torch.no_grad():
        embeddings.position_embeddings.copy_(torch.from_numpy(pos))
        for h, w in [(12, 10), (5, 6), (8, 3), (11, 11)]:
            tokens = torch.zeros(1, prefix + h * w, dim)
            ref = embeddings.interpolate_pos_encoding(tokens, height=h * patch, width=w * patch).numpy()
            ours = resample_pos_embed(pos, (h, w), prefix, "bicubic", antialias=False)
            err = _max_err(ours, ref.astype(np.float64))
            assert err < ATOL_F32, f"8x8 -> {h}x{w}: max error {err:.2e} against {type(embeddings).__name__}"


TINY = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=32)


def test_matches_transformers_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**TINY, patch_size=4), add_pooling_layer=False)
    _check_transformers(model.embeddings, prefix=1, patch=4, dim=8)


def test_matches_transformers_deit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.DeiTModel(transformers.DeiTConfig(**TINY, patch_size=4), add_pooling_layer=False)
    _check_transformers(model.embeddings, prefix=2, patch=4, dim=8)


def test_matches_transformers_dinov2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY, patch_size=4))
    _check_transformers(model.embeddings, prefix=1, patch=4, dim=8)


def test_dtype_is_kept():
    pos = np.random.default_rng(4).standard_normal((1, 1 + 16, 4)).astype(np.float16)
    out = resample_pos_embed(pos, (3, 5), 1)
    assert out.dtype == np.float16 and out.shape == (1, 1 + 15, 4)
    np.testing.assert_array_equal(out[:, :1], pos[:, :1])


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((1, 1 + 15, 4), dict(grid=(4, 4), num_prefix_tokens=1), "not a square"),
        ((1, 17, 4), dict(grid=(4, 4), num_prefix_tokens=0), "not a square"),
        ((1, 3, 4), dict(grid=(2, 2), num_prefix_tokens=3), "cannot hold"),
        ((1, 3, 4), dict(grid=(2, 2), num_prefix_tokens=-1), "cannot hold"),
        ((1, 1 + 16, 4), dict(grid=(0, 4), num_prefix_tokens=1), "at least 1x1"),
        ((1, 1 + 16, 4), dict(grid=(4, -2), num_prefix_tokens=1), "at least 1x1"),
        ((1, 1 + 16, 4), dict(grid=(4, 4), num_prefix_tokens=1, old_grid=(3, 5)), "does not match"),
        ((1, 1 + 16, 4), dict(grid=(5, 5), num_prefix_tokens=1, interpolation="nearest"), "interpolation"),
        ((2, 1 + 16, 4), dict(grid=(5, 5), num_prefix_tokens=1), r"\(1, tokens, dim\)"),
        ((1 + 16, 4), dict(grid=(5, 5), num_prefix_tokens=1), r"\(1, tokens, dim\)"),
    ],
)
def test_errors(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        resample_pos_embed(np.zeros(shape, np.float32), **kwargs)


def test_grid_errors():
    with pytest.raises(ValueError, match="at least 1x1"):
        resample_grid(np.zeros((4, 4, 2), np.float32), (0, 3), "bilinear", False)
    with pytest.raises(ValueError, match=r"\(H, W, D\)"):
        resample_grid(np.zeros((4, 4), np.float32), (2, 2), "bilinear", False)
    with pytest.raises(ValueError, match="interpolation"):
        resample_grid(np.zeros((4, 4, 2), np.float32), (2, 2), "area", True)
