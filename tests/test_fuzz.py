"""Property tests (hypothesis) for the readers of untrusted files: safetensors headers, the torch unpickler,
the image loader and config.json.

Whatever the bytes, each reader either returns what it promises or raises the project's own typed error with a
one-line message naming the file -- never another exception, never a crash, never an import. CI runs a few
hundred examples per target (a few seconds each); FUZZ_EXAMPLES=N runs N per target, for long sessions:

    FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from checkpoints import IMAGES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlx_vit.convert.hf import check_config
from mlx_vit.convert.safetensors_io import read_header, read_safetensors
from mlx_vit.convert.torch_pickle import read_torch_bin
from mlx_vit.errors import CheckpointError, ConfigError, ImageError
from mlx_vit.images import open_image
from mlx_vit.preprocess import PreprocessConfig, preprocess

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz(ci_examples: int) -> settings:
    """Hypothesis settings: `ci_examples` in CI, FUZZ_EXAMPLES when set."""
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        database=None,  # leaves no .hypothesis folder behind
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _one_line_naming(error: Exception, path: Path) -> None:
    message = str(error)
    assert str(path) in message, message
    assert "\n" not in message and "\r" not in message, repr(message)


def _mutations(seed_len: int):
    """Edits of a seed file: overwrite bytes, insert bytes, cut the end."""
    return st.tuples(
        st.lists(st.tuples(st.integers(0, max(seed_len - 1, 0)), st.integers(0, 255)), max_size=8),
        st.lists(st.tuples(st.integers(0, seed_len), st.binary(min_size=1, max_size=16)), max_size=2),
        st.one_of(st.none(), st.integers(0, seed_len)),
    )


def _mutate(seed: bytes, mutation) -> bytes:
    edits, inserts, cut = mutation
    raw = bytearray(seed)
    for position, value in edits:
        if position < len(raw):
            raw[position] = value
    for position, chunk in sorted(inserts, reverse=True):
        raw[position:position] = chunk
    return bytes(raw[:cut])


# ----------------------------------------------------------------------------------------------------------
# safetensors


def _valid_safetensors_bytes() -> bytes:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64),
               "m": np.array([1, 0, 1], dtype=np.uint8)}  # fmt: skip
    return safetensors.numpy.save(tensors, metadata={"format": "np"})


VALID_ST = _valid_safetensors_bytes()


def _st_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _read_st_or_refuse(path: Path) -> None:
    try:
        result = read_safetensors(path)
    except CheckpointError as error:
        _one_line_naming(error, path)
    else:
        assert all(isinstance(v, np.ndarray) for v in result.values())
        header, _ = read_header(path)
        for name, entry in header.items():
            assert list(result[name].shape) == entry["shape"]


@fuzz(200)
@given(raw=st.binary(max_size=256))
def test_fuzz_safetensors_random_bytes(tmp_path, raw):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    _read_st_or_refuse(path)


@fuzz(200)
@given(mutation=_mutations(len(VALID_ST)))
def test_fuzz_safetensors_mutated(tmp_path, mutation):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_mutate(VALID_ST, mutation))
    _read_st_or_refuse(path)


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4))
_DIM = st.one_of(st.integers(0, 4), st.integers(-(2**65), 2**66), _JSON_LEAF)


@fuzz(200)
@given(
    entries=st.dictionaries(
        st.one_of(st.text(max_size=3), st.just("__metadata__")),
        st.one_of(
            st.fixed_dictionaries({
                "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "BOOL", "X"]),
                                   _JSON_LEAF, st.lists(_JSON_LEAF, max_size=2)),
                "shape": st.one_of(st.lists(_DIM, max_size=4), _JSON_LEAF),
                "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-2, 40), _DIM), max_size=3),
                                          _JSON_LEAF),
            }),
            st.dictionaries(st.text(max_size=2), _JSON_LEAF, max_size=2),
            _JSON_LEAF,
        ),
        max_size=3,
    ),
    data=st.binary(max_size=40),
)  # fmt: skip
def test_fuzz_safetensors_structured_headers(tmp_path, entries, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_st_bytes(json.dumps(entries).encode(), data))
    _read_st_or_refuse(path)


# ----------------------------------------------------------------------------------------------------------
# torch unpickler

# Modules no test imports: if the unpickler ever imported what a pickle names, one would appear in sys.modules.
WATCHED = ("antigravity", "tabnanny", "this", "pydoc", "runpy", "webbrowser")


def _valid_torch_bytes() -> tuple[bytes, bytes]:
    buffer = io.BytesIO()
    torch.save({"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.tensor([1, 2], dtype=torch.int64),
                "c": torch.tensor(1.5).bfloat16(), "d": torch.nn.Parameter(torch.ones(2))}, buffer)  # fmt: skip
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        pkl = archive.read("archive/data.pkl")
    return buffer.getvalue(), pkl


VALID_TORCH, VALID_PKL = _valid_torch_bytes()


def _read_torch_or_refuse(path: Path) -> None:
    before = {name for name in WATCHED if name in sys.modules}
    try:
        result = read_torch_bin(path)
    except CheckpointError as error:
        _one_line_naming(error, path)
    else:
        assert isinstance(result, dict)
        assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in result.items())
    assert {name for name in WATCHED if name in sys.modules} == before


def _zip_with_pickle(path: Path, pickled: bytes) -> Path:
    with zipfile.ZipFile(io.BytesIO(VALID_TORCH)) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            new.writestr(info, pickled if info.filename.endswith("data.pkl") else old.read(info.filename))
    return path


@fuzz(200)
@given(mutation=_mutations(len(VALID_PKL)))
def test_fuzz_torch_mutated_data_pkl(tmp_path, mutation):
    _read_torch_or_refuse(_zip_with_pickle(tmp_path / "fuzz.bin", _mutate(VALID_PKL, mutation)))


@fuzz(100)
@given(mutation=_mutations(len(VALID_TORCH)))
def test_fuzz_torch_mutated_zip(tmp_path, mutation):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(_mutate(VALID_TORCH, mutation))
    _read_torch_or_refuse(path)


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


_GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"),
    ("torch", "LongStorage"), ("collections", "OrderedDict"), ("os", "system"), ("posix", "system"),
    ("builtins", "eval"), ("builtins", "getattr"), ("importlib", "import_module"), ("antigravity", "geohash"),
    ("tabnanny", "check"), ("operator", "attrgetter"), ("torch._utils", "_rebuild_from_type_v2"),
    ("copyreg", "_reconstructor"), ("pydoc", "locate"), ("runpy", "run_path"), ("this", "s"),
]  # fmt: skip
# Pickle opcodes (protocol 4), some with arguments: globals, calls, containers, memo, persistent ids, extensions.
_OPCODES = st.one_of(
    st.sampled_from([b"N", b"}", b"]", b")", b"(", b"t", b"\x85", b"\x86", b"\x87", b"\x88", b"\x89", b"R", b"b",
                     b"\x81", b"\x92", b"o", b"s", b"u", b"a", b"e", b"\x8f", b"\x90", b"\x91", b"\x94", b"Q", b"2",
                     b"0", b"1", b"\x93", b"l"]),
    st.builds(lambda m: b"c" + f"{m[0]}\n{m[1]}\n".encode(), st.sampled_from(_GLOBALS)),
    st.builds(lambda m: _text(m[0]) + _text(m[1]) + b"\x93", st.sampled_from(_GLOBALS)),
    st.builds(lambda m: b"i" + f"{m[0]}\n{m[1]}\n".encode(), st.sampled_from(_GLOBALS)),
    st.builds(lambda i: b"K" + bytes([i]), st.integers(0, 255)),
    st.builds(lambda i: b"J" + struct.pack("<i", i), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda i: b"\x8a\x09" + i.to_bytes(9, "little", signed=True), st.integers(-(2**71), 2**71 - 1)),
    st.builds(lambda i: b"q" + bytes([i]), st.integers(0, 4)),
    st.builds(lambda i: b"h" + bytes([i]), st.integers(0, 4)),
    st.builds(lambda i: b"\x82" + bytes([i]), st.integers(0, 255)),
    st.builds(_text, st.sampled_from(["storage", "0", "1", "cpu", "w", "state_dict", "../0", "data.pkl"])),
)  # fmt: skip


@fuzz(300)
@given(program=st.lists(_OPCODES, max_size=40))
def test_fuzz_torch_pickle_programs(tmp_path, program):
    """Random protocol-4 pickles made of dangerous and allowlisted globals, calls, memo and persistent ids."""
    _read_torch_or_refuse(_zip_with_pickle(tmp_path / "fuzz.bin", b"\x80\x04" + b"".join(program) + b"."))


# ----------------------------------------------------------------------------------------------------------
# images


def _image_seeds() -> dict[str, bytes]:
    """Small real files in every format and mode the loader handles specially."""
    photo = Image.open(IMAGES / "chelsea.png").convert("RGB").resize((24, 16))
    seeds = {}

    def save(name: str, image: Image.Image, format: str, **kwargs) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format, **kwargs)
        seeds[name] = buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    save("rgb.png", photo, "PNG")
    save("oriented.jpg", photo, "JPEG", exif=exif, quality=80)
    save("progressive.jpg", photo, "JPEG", progressive=True)
    save("cmyk.jpg", photo.convert("CMYK"), "JPEG")
    save("palette.gif", photo.convert("P"), "GIF", transparency=0)
    frames = [photo, photo.rotate(90), photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames])
    save("multi.tif", frames[0], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_lzw")
    save("gray16.png", Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257), "PNG")
    save("gray16.tif", Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257), "TIFF")
    save("la.png", photo.convert("LA"), "PNG")
    save("rgba.webp", photo.convert("RGBA"), "WEBP")
    save("animated.webp", frames[0], "WEBP", save_all=True, append_images=frames[1:])
    save("bitonal.bmp", photo.convert("1"), "BMP")
    save("icon.ico", photo, "ICO")
    seeds["multipage.tif"] = (IMAGES / "multipage.tif").read_bytes()
    seeds["tiny.gif"] = (IMAGES / "no_time_for_that_tiny.gif").read_bytes()
    return seeds


IMAGE_SEEDS = _image_seeds()
PREPROCESS = PreprocessConfig.from_hf({"size": {"shortest_edge": 20}, "do_center_crop": True, "crop_size": 16})


def _open_or_refuse(path: Path) -> None:
    try:
        image = open_image(path, max_pixels=1_000_000)
    except ImageError as error:
        _one_line_naming(error, path)
    else:
        assert image.mode == "RGB" and image.width * image.height <= 1_000_000
        pixels = preprocess(image, PREPROCESS)
        assert pixels.shape == (16, 16, 3) and np.isfinite(pixels).all()


@pytest.mark.parametrize("seed", list(IMAGE_SEEDS))
def test_image_seeds_open(seed, tmp_path):
    path = tmp_path / seed
    path.write_bytes(IMAGE_SEEDS[seed])
    assert open_image(path).mode == "RGB"


@fuzz(200)
@given(seed=st.sampled_from(list(IMAGE_SEEDS)), data=st.data())
def test_fuzz_image_mutated(tmp_path, seed, data):
    raw = IMAGE_SEEDS[seed]
    path = tmp_path / f"fuzz-{seed}"
    path.write_bytes(_mutate(raw, data.draw(_mutations(len(raw)))))
    _open_or_refuse(path)


@fuzz(200)
@given(raw=st.binary(max_size=64), seed=st.sampled_from(list(IMAGE_SEEDS)))
def test_fuzz_image_header_then_noise(tmp_path, raw, seed):
    """A real file's first bytes (its magic and header) followed by noise."""
    path = tmp_path / "fuzz.img"
    path.write_bytes(IMAGE_SEEDS[seed][:32] + raw)
    _open_or_refuse(path)


# ----------------------------------------------------------------------------------------------------------
# config.json

_CONFIG_VALUE = st.one_of(
    st.integers(-5, 300), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.booleans(), st.none(),
    st.text(max_size=6), st.lists(st.integers(0, 300), max_size=3), st.dictionaries(st.text(max_size=2), st.integers()),
)  # fmt: skip
_CONFIG_KEYS = ["image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias", "architectures", "id2label",
                "model_type", "pooler_act", "encoder_stride"]  # fmt: skip


@fuzz(300)
@given(changes=st.dictionaries(st.sampled_from(_CONFIG_KEYS), _CONFIG_VALUE, max_size=4))
def test_fuzz_config_json(changes):
    config = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "image_size": 32, "patch_size": 8, **changes}  # fmt: skip
    try:
        check_config(config, "/models/x/config.json")
    except ConfigError as error:
        assert str(error).startswith("/models/x/config.json: ") and "\n" not in str(error), str(error)


_PREPROCESSOR_KEYS = ["size", "crop_size", "do_center_crop", "do_resize", "resample", "image_mean", "image_std",
                      "rescale_factor", "do_normalize"]  # fmt: skip


@fuzz(300)
@given(values=st.dictionaries(st.sampled_from(_PREPROCESSOR_KEYS), _CONFIG_VALUE, max_size=4))
def test_fuzz_preprocessor_config(values):
    try:
        config = PreprocessConfig.from_hf(values, "vit", "/models/x/preprocessor_config.json")
    except ConfigError as error:
        assert str(error).startswith("/models/x/preprocessor_config.json: ") and "\n" not in str(error)
    else:
        assert PreprocessConfig.from_dict(config.to_dict()) == config
