"""Hostile and broken input: every case is refused with a one-line typed error naming the file, nothing in it
runs or is imported, and a batch of photos mixed with broken files still classifies every good photo.

Checkpoint attacks here extend tests/test_checkpoint_readers.py (os.system, exec/eval, subprocess, GLOBAL /
STACK_GLOBAL / INST / OBJ, legacy format, storage bounds); the property tests are in tests/test_fuzz.py.
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import json
import pickle
import pickletools
import shutil
import struct
import sys
import threading
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import IMAGES, run_cli
from PIL import Image, ImageOps

from mlx_vit.convert import hf
from mlx_vit.convert import torch_pickle as tp
from mlx_vit.convert.safetensors_io import read_safetensors
from mlx_vit.errors import CheckpointError, ConfigError, ImageError, ModelNotFoundError
from mlx_vit.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig, open_image, preprocess, set_max_pixels, to_rgb


def _one_line_error(kind, call, *args, names: Path | str | None = None, **kwargs) -> str:
    with pytest.raises(kind) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, repr(message)
    if names is not None:
        assert str(names) in message, message
    return message


# ==========================================================================================================
# 1. Checkpoints: the unpickler

# Standard-library modules nothing imports in these tests (antigravity would open a web browser): if the
# unpickler ever imported what a pickle names, the module would show up in sys.modules.
UNIMPORTED = ["antigravity", "tabnanny", "this", "pydoc", "runpy", "pkgutil"]


@pytest.fixture
def unimported():
    before = {m for m in UNIMPORTED if m in sys.modules}
    assert "antigravity" not in before and "tabnanny" not in before  # the payloads' own targets
    yield
    assert {m for m in UNIMPORTED if m in sys.modules} == before


def _torch_zip(path: Path, pickled: bytes) -> Path:
    """A real torch.save() zip (with its storage) whose data.pkl is replaced by `pickled`."""
    real = io.BytesIO()
    torch.save({"w": torch.ones(2)}, real)
    with zipfile.ZipFile(real) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            new.writestr(info, pickled if info.filename.endswith("data.pkl") else old.read(info.filename))
    return path


class Pickle:
    """A hand assembler for pickles naming any global, importable here or not, in any protocol 0..5."""

    def __init__(self, protocol: int):
        self.protocol = protocol
        self.code = bytearray(b"" if protocol < 2 else bytes([0x80, protocol]))

    def raw(self, code: bytes) -> Pickle:
        self.code += code
        return self

    def glob(self, module: str, name: str) -> Pickle:
        if self.protocol >= 4:
            return self.text(module).text(name).raw(b"\x93")  # STACK_GLOBAL
        return self.raw(f"c{module}\n{name}\n".encode())  # GLOBAL

    def text(self, value: str) -> Pickle:
        raw = value.encode()
        if self.protocol == 0:
            return self.raw(b"V" + value.encode("raw_unicode_escape") + b"\n")
        if self.protocol >= 4 and len(raw) < 256:
            return self.raw(b"\x8c" + bytes([len(raw)]) + raw)
        return self.raw(b"X" + struct.pack("<I", len(raw)) + raw)

    def call(self, module: str, name: str, *args: str | Pickle) -> Pickle:
        """module.name(*args), args being strings or (nested) pickles of calls."""
        self.glob(module, name).raw(b"(")
        for arg in args:
            if isinstance(arg, str):
                self.text(arg)
            else:
                self.raw(bytes(arg.code[2:] if arg.protocol >= 2 else arg.code))
        return self.raw(b"tR")

    def dumps(self) -> bytes:
        return bytes(self.code) + b"."


def test_assembler_makes_pickles_that_python_runs():
    """The assembler is right: a harmless payload runs under the standard unpickler, in every protocol."""
    for protocol in range(6):
        nested = Pickle(protocol).call("builtins", "str", "ab")
        payload = Pickle(protocol).call("builtins", "len", nested).dumps()
        assert pickle.loads(payload) == 2, protocol
        assert {op.name for op, _, _ in pickletools.genops(payload)} >= (
            {"STACK_GLOBAL"} if protocol >= 4 else {"GLOBAL"}
        )


def _import_chain(protocol: int) -> Pickle:
    # getattr(importlib.import_module("antigravity"), "geohash")(...)
    module = Pickle(protocol).call("importlib", "import_module", "antigravity")
    return Pickle(protocol).call("builtins", "getattr", module, "geohash")


ATTACKS = {
    # id: (pickle builder for a protocol, the global the refusal names)
    "importlib.import_module": (lambda p: Pickle(p).call("importlib", "import_module", "antigravity"),
                                "importlib.import_module"),
    "getattr(import_module())": (_import_chain, "builtins.getattr"),
    "builtins.__import__": (lambda p: Pickle(p).call("builtins", "__import__", "tabnanny"), "builtins.__import__"),
    "operator.attrgetter": (lambda p: Pickle(p).call("operator", "attrgetter", "system"), "operator.attrgetter"),
    "operator.methodcaller": (lambda p: Pickle(p).call("operator", "methodcaller", "system", "touch MARKER"),
                              "operator.methodcaller"),
    "pkgutil.resolve_name": (lambda p: Pickle(p).call("pkgutil", "resolve_name", "os:system"), "pkgutil.resolve_name"),
    "pydoc.locate": (lambda p: Pickle(p).call("pydoc", "locate", "os.system"), "pydoc.locate"),
    "runpy.run_path": (lambda p: Pickle(p).call("runpy", "run_path", "/tmp/evil.py"), "runpy.run_path"),
    "this.s (never imported)": (lambda p: Pickle(p).glob("this", "s"), "this.s"),
    "torch._rebuild_from_type_v2": (lambda p: Pickle(p).call("torch._utils", "_rebuild_from_type_v2", "x"),
                                    "torch._utils._rebuild_from_type_v2"),
    "numpy _reconstruct": (lambda p: Pickle(p).call("numpy.core.multiarray", "_reconstruct", "x"),
                           "numpy.core.multiarray._reconstruct"),
    "dotted name": (lambda p: Pickle(p).call("os", "path.os.system", "touch MARKER"), "os.path.os.system"),
    "copyreg._reconstructor": (lambda p: Pickle(p).call("copyreg", "_reconstructor", "x"), "copyreg._reconstructor"),
    "nt.system": (lambda p: Pickle(p).call("nt", "system", "calc.exe"), "nt.system"),
}  # fmt: skip


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_gadgets_are_refused_in_every_protocol(tmp_path, unimported, attack, protocol):
    build, refused = ATTACKS[attack]
    path = _torch_zip(tmp_path / "pytorch_model.bin", build(protocol).dumps())
    message = _one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    assert f"refusing global {refused} " in message, message


@pytest.mark.parametrize(
    "nesting",
    ["set", "frozenset", "tuple key", "BUILD state", "persistent id", "tensor hooks", "OrderedDict items"],
)
def test_reduce_nested_inside_containers_is_refused(tmp_path, unimported, nesting):
    evil = Pickle(4).call("importlib", "import_module", "antigravity")
    body = bytes(evil.code[2:])
    storage = b"\x8c\x07storage\x8c\x05torch\x8c\x0cFloatStorage\x93\x8c\x010\x8c\x03cpuK\x02t"
    payload = {
        "set": b"\x8f(" + body + b"\x90",  # EMPTY_SET, MARK, ..., ADDITEMS
        "frozenset": b"(" + body + b"\x91",
        "tuple key": b"}(" + body + b"K\x01\x86K\x02s",  # {(evil, 1): 2}
        "BUILD state": b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R}\x8c\x09_metadata" + body + b"sb",
        "persistent id": b"(\x8c\x07storage" + body + b"\x8c\x010\x8c\x03cpuK\x02tQ",
        "tensor hooks": (b"\x8c\x0ctorch._utils\x8c\x12_rebuild_tensor_v2\x93(" + storage + b"QK\x00K\x02\x85K\x01\x85"
                         b"\x89" + body + b"tR"),
        "OrderedDict items": b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R(\x8c\x01w" + body + b"u",
    }[nesting]  # fmt: skip
    path = _torch_zip(tmp_path / "nested.bin", b"\x80\x04" + payload + b".")
    message = _one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    assert "refusing global importlib.import_module" in message


def test_memo_games(tmp_path, unimported):
    # A refused global is refused where it is named: memoizing it and getting it back never gets that far.
    evil = b"\x80\x02cantigravity\ngeohash\nq\x00h\x00(tR."
    message = _one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / "a.bin", evil))
    assert "refusing global antigravity.geohash" in message
    # The same through MEMOIZE and BINGET in protocol 4.
    evil = b"\x80\x04\x8c\x0bantigravity\x8c\x07geohash\x93\x94h\x00)R."
    message = _one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / "b.bin", evil))
    assert "refusing global antigravity.geohash" in message
    # Getting what was never put, or a memo index past anything, is malformed, not a crash.
    for i, bad in enumerate([b"\x80\x02h\x05.", b"\x80\x02j\xff\xff\xff\xff.", b"\x80\x02g7\n."]):
        message = _one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / f"m{i}.bin", bad))
        assert "malformed" in message
    # An allowlisted object fetched from the memo still cannot be modified (BUILD) or misused.
    for i, bad in enumerate([
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00h\x00N}X\x0e\x00\x00\x00__kwdefaults__}ss\x86b.",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00h\x00}X\x03\x00\x00\x00zzzK\x01sb.",
        b"\x80\x02ccollections\nOrderedDict\nq\x00h\x00}X\x03\x00\x00\x00zzzK\x01sb.",
        b"\x80\x02ctorch\nFloatStorage\nq\x00h\x00(tR.",  # calling a storage type
        b"\x80\x02ctorch\nFloatStorage\nq\x00h\x00)\x81.",  # NEWOBJ on it
    ]):  # fmt: skip
        _one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / f"b{i}.bin", bad))
    assert not hasattr(tp._rebuild_tensor, "zzz") and tp._rebuild_tensor.__kwdefaults__ is None
    good = tmp_path / "good.bin"
    torch.save({"x": torch.tensor([1.0, -2.0])}, good)
    np.testing.assert_array_equal(tp.read_torch_bin(good)["x"], [1.0, -2.0])


@pytest.mark.parametrize(
    "opcode", [b"\x82\xf0", b"\x83\xf0\x00", b"\x84\xf0\x00\x00\x00"], ids=["EXT1", "EXT2", "EXT4"]
)
def test_copyreg_extension_codes_are_refused(tmp_path, unimported, opcode):
    path = _torch_zip(tmp_path / "ext.bin", b"\x80\x02" + opcode + b"(X\x01\x00\x00\x00xtR.")
    copyreg.add_extension("antigravity", "geohash", 0xF0)
    try:
        message = _one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
        assert "refusing global antigravity.geohash (copyreg extension 240)" in message
        # Even when the process has already resolved that code once (copyreg caches it, and the C unpickler would
        # then skip find_class), the allowlist holds.
        copyreg._extension_cache[0xF0] = print
        message = _one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
        assert "refusing global antigravity.geohash" in message
    finally:
        copyreg._extension_cache.pop(0xF0, None)
        copyreg.remove_extension("antigravity", "geohash", 0xF0)
    message = _one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)  # unregistered code
    assert "refusing global ?.extension code 240" in message


def test_refused_names_are_shown_on_one_line(tmp_path):
    payload = b"\x80\x04\x8c\x0bos\nFAKE: ok\x8c\x06system\x93."
    message = _one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / "n.bin", payload))
    assert "refusing global os\\nFAKE: ok.system" in message
    long_name = "x" * 10_000
    payload = b"\x80\x04X" + struct.pack("<I", len(long_name)) + long_name.encode() + b"\x8c\x01y\x93."
    message = _one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / "l.bin", payload))
    assert len(message) < 400


# ---- storages against the archive


class _StorageRef:
    def __init__(self, key: str, numel: int, storage_type: str = "FloatStorage"):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, {})

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, obj.storage_type), obj.key, "cpu", obj.numel)
        return None


def _crafted(path: Path, tensors: dict, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(tensors)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for name, raw in members.items():
            archive.writestr(f"archive/{name}", raw, compress_type=compress)
    return path


def test_storage_sizes_are_checked_against_the_archive_before_reading(tmp_path):
    four = np.arange(4, dtype="<f4").tobytes()
    # A numel far beyond the member: refused from the zip directory, without reading or allocating.
    path = _crafted(tmp_path / "huge.bin", {"w": _TensorRef(_StorageRef("0", 2**60), 0, (1,), (1,))}, {"data/0": four})
    message = _one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    assert "16 bytes, 1152921504606846976 elements declared" in message
    # A storage key that walks out of data/ only finds nothing in the archive (it never touches the disk).
    path = _crafted(tmp_path / "walk.bin", {"w": _TensorRef(_StorageRef("../../../etc/passwd", 1), 0, (1,), (1,))},
                    {"data/0": four})  # fmt: skip
    assert "missing from the archive" in _one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    # A compressed storage whose member inflates to megabytes: only the declared elements are read.
    bomb = four + bytes(8 * 2**20)
    path = _crafted(tmp_path / "bomb.bin", {"w": _TensorRef(_StorageRef("0", 4), 1, (3,), (1,))}, {"data/0": bomb},
                    compress=zipfile.ZIP_DEFLATED)  # fmt: skip
    assert path.stat().st_size < 100_000
    np.testing.assert_array_equal(tp.read_torch_bin(path)["w"], [1.0, 2.0, 3.0])


def test_oversized_data_pkl_and_byteorder_are_refused(tmp_path, monkeypatch):
    real = tmp_path / "real.bin"
    torch.save({f"w{i}": torch.ones(1) for i in range(50)}, real)
    monkeypatch.setattr(tp, "MAX_PICKLE_BYTES", 1000)
    message = _one_line_error(CheckpointError, tp.read_torch_bin, real, names=real)
    assert "data.pkl is" in message and "limit 1000" in message
    path = tmp_path / "byteorder.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("archive/byteorder", b"little" * 1000, compress_type=zipfile.ZIP_DEFLATED)
    assert "byteorder is 6000 bytes" in _one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)


def test_hostile_checkpoint_through_the_cli(vit_folder, tmp_path, isolated):
    """`convert` and `classify -m` on a folder whose pytorch_model.bin runs code: one line, exit 1, nothing ran."""
    folder = tmp_path / "evil-model"
    shutil.copytree(vit_folder, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    (folder / "pytorch_model.bin").write_bytes(
        _torch_zip(tmp_path / "x.bin", Pickle(2).call("posix", "system", f"touch {marker}").dumps()).read_bytes()
    )
    for args in (["convert", folder, "-o", tmp_path / "out"], ["classify", IMAGES / "chelsea.png", "-m", folder]):
        done = run_cli(*args, env=isolated)
        assert done.returncode == 1, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
        assert str(folder / "pytorch_model.bin") in errors[0] and "refusing global posix.system" in errors[0]
        assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ==========================================================================================================
# 1. Checkpoints: safetensors additions (the base cases are in test_checkpoint_readers.py)


def _st(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_safetensors_duplicate_names_and_bad_metadata(tmp_path):
    twice = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
            b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'  # fmt: skip
    path = _st(tmp_path / "twice.safetensors", twice, b"xy")
    assert "names 'a' twice" in _one_line_error(CheckpointError, read_safetensors, path, names=path)
    for i, metadata in enumerate([b"[1]", b'{"k": 1}', b'{"k": {"nested": "x"}}']):
        path = _st(tmp_path / f"meta{i}.safetensors", b'{"__metadata__": ' + metadata + b"}")
        assert "__metadata__" in _one_line_error(CheckpointError, read_safetensors, path, names=path)
    assert read_safetensors(_st(tmp_path / "null.safetensors", b'{"__metadata__": null}')) == {}  # as serde reads it


# ==========================================================================================================
# 1. Checkpoints: config.json


@pytest.fixture
def hf_copy(vit_folder, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(vit_folder, folder)
    return folder


def _edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


CONFIG_CASES = {
    # id: (changes, words the message holds)
    "hidden_size 10^9": (dict(hidden_size=10**9), "over the limit"),
    "hidden_size 10^6": (dict(hidden_size=10**6, num_attention_heads=1), "parameters; refusing"),
    "10^6 layers": (dict(num_hidden_layers=10**6), "num_hidden_layers 1000000 is over the limit of 1024"),
    "image_size 10^6": (dict(image_size=10**6), "image_size 1000000 at patch_size 8 makes 15,625,000,000 tokens"),
    "image_size 10^8": (dict(image_size=10**8, patch_size=10**8), "image_size 100000000 is over the limit"),
    "image 65536 / patch 8": (dict(image_size=65536), "tokens (limit 16,384)"),
    "patch_size = image_size = 16384": (dict(image_size=16384, patch_size=16384), "activations would hold"),
    "heads 10^9": (dict(num_attention_heads=10**9), "num_attention_heads 1000000000 is over the limit"),
    "intermediate 10^12": (dict(intermediate_size=10**12), "intermediate_size 1000000000000 is over"),
    "channels 10^7": (dict(num_channels=10**7), "activations would hold"),
    "hidden_size string": (dict(hidden_size="32"), "hidden_size must be a positive integer, got '32'"),
    "hidden_size float": (dict(hidden_size=32.0), "got 32.0"),
    "hidden_size true": (dict(hidden_size=True), "got True"),
    "hidden_size negative": (dict(hidden_size=-32), "got -32"),
    "hidden_size zero": (dict(hidden_size=0), "got 0"),
    "hidden_size null": (dict(hidden_size=None), "got None"),
    "hidden_size list": (dict(hidden_size=[32]), "got [32]"),
    "hidden_size 2^200": (dict(hidden_size=2**200), "an integer of 201 bits"),
    "layers float": (dict(num_hidden_layers=2.5), "num_hidden_layers must be a positive integer"),
    "image_size list of two": (dict(image_size=[32, 48]), "image_size must be a positive integer"),
    "hidden_act list": (dict(hidden_act=["gelu"]), "hidden_act ['gelu'] is not supported"),
    "hidden_act unknown": (dict(hidden_act="os.system"), "hidden_act 'os.system' is not supported"),
    "qkv_bias string": (dict(qkv_bias="yes"), "qkv_bias must be true or false"),
    "layer_norm_eps string": (dict(layer_norm_eps="1e-12"), "layer_norm_eps must be a small positive number"),
    "layer_norm_eps negative": (dict(layer_norm_eps=-1), "layer_norm_eps"),
    "model_type missing": (dict(model_type=...), "model_type None is not supported"),
    "model_type long": (dict(model_type="x" * 10_000), "model_type '" + "x" * 36 + "... is not supported"),
    "model_type other": (dict(model_type="llama"), "model_type 'llama' is not supported"),
    "architectures dict": (dict(architectures={"0": "ViTModel"}), "architectures must be a list"),
    "architectures unknown": (dict(architectures=["EvilForRCE"]), "architecture 'EvilForRCE' is not supported"),
    "heads do not divide": (dict(num_attention_heads=5), "not divisible"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_json_is_checked_before_weights_are_read(hf_copy, monkeypatch, case):
    changes, needle = CONFIG_CASES[case]
    path = _edit_config(hf_copy, **changes)

    def no_weights(folder):
        raise AssertionError("weights were read before config.json was checked")

    monkeypatch.setattr(hf, "read_weights", no_weights)
    message = _one_line_error(ConfigError, hf.read_hf_checkpoint, hf_copy, names=path)
    assert needle in message, message
    assert len(message) < 300


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'{"model_type": "vit", ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'"vit"', "expected a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"hidden_size": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"model_type": "vit", "hidden_size": NaN}', "not valid JSON (NaN is not a JSON number)"),
        (b'{"model_type": "vit", "layer_norm_eps": Infinity}', "not valid JSON (Infinity is not a JSON number)"),
    ],
)
def test_malformed_config_json(hf_copy, content, needle):
    (hf_copy / "config.json").write_bytes(content)
    message = _one_line_error(ConfigError, hf.read_hf_checkpoint, hf_copy, names=hf_copy / "config.json")
    assert needle in message, message


def test_config_json_too_large(hf_copy, monkeypatch):
    from mlx_vit import files

    monkeypatch.setattr(files, "MAX_JSON_BYTES", 100)
    message = _one_line_error(ConfigError, hf.read_hf_checkpoint, hf_copy, names=hf_copy / "config.json")
    assert "too large for a config file" in message


@pytest.mark.parametrize(
    "processor, needle",
    [
        ({"size": 10**6}, "sides must be integers from 1 to 32768"),
        ({"size": "224"}, "unsupported size '224'"),
        ({"size": {"height": "32", "width": 32}}, "sides must be integers"),
        ({"size": {"shortest_edge": -1}}, "sides must be integers"),
        ({"do_center_crop": True, "crop_size": {"height": 0, "width": 32}}, "sides must be integers"),
        ({"do_center_crop": True, "crop_size": None}, "crop_size is missing"),
        ({"image_std": 0}, "image_std must not be zero"),
        ({"image_mean": ["a", "b", "c"]}, "image_mean must be three finite numbers"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be three finite numbers"),
        ({"image_std": [1, 1, float("nan")]}, "NaN is not a JSON number"),
        ({"resample": 99}, "unknown resample filter 99"),
        ({"resample": "bilinear"}, "unknown resample filter"),
        ({"do_resize": "yes"}, "do_resize must be true or false"),
        ({"rescale_factor": "1/255"}, "rescale_factor must be a finite number"),
    ],
)
def test_malformed_preprocessor_config(hf_copy, processor, needle):
    path = hf_copy / "preprocessor_config.json"
    path.write_text(json.dumps({"size": 32, **processor}))
    message = _one_line_error(ConfigError, hf.read_hf_checkpoint, hf_copy, names=path)
    assert needle in message, message


def test_hostile_converted_folder_config(vit_folder, tmp_path):
    """An mlx-vit folder from someone else: its config.json is checked as strictly as a transformers one."""
    from mlx_vit.classify import load
    from mlx_vit.convert import convert

    out = convert(str(vit_folder), tmp_path / "mlx")
    (out / "manifest.json").unlink(missing_ok=True)  # a folder made by hand: nothing to check it against
    good = json.loads((out / "config.json").read_text())
    cases = [
        ({"model": {**good["model"], "hidden_size": 10**9}}, "hidden_size 1000000000 is over the limit"),
        ({"model": {**good["model"], "num_hidden_layers": "2"}}, "num_hidden_layers must be a positive integer"),
        ({"preprocessing": {**good["preprocessing"], "size": {"height": 10**7, "width": 32}}}, "sides must be"),
        ({"preprocessing": {**good["preprocessing"], "exec": "os.system"}}, "preprocessing must be an object"),
    ]
    for changes, needle in cases:
        (out / "config.json").write_text(json.dumps({**good, **changes}))
        # (the preprocessing errors name only "config.json": the Classifier does not pass its folder on)
        message = _one_line_error(ConfigError, load, str(out), names=out if "model" in changes else "config.json")
        assert needle in message, message


# ==========================================================================================================
# 1. Checkpoints: Hub ids, revisions, downloads, tokens

TOKEN = "hf_MARKERtokenNEVERshown0123456789"


class FakeHub:
    """A local Hugging Face Hub serving one repository; it records each request and can fail every request
    with a status whose body and headers echo the client's Authorization header back."""

    def __init__(self, files: dict[str, bytes], repo: str = "org/model", sha: str = "e" * 40):
        self.files, self.repo, self.sha = files, repo, sha
        self.fail_with: int | None = None
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                hub.requests.append((self.command, self.path))
                if hub.fail_with:
                    echo = json.dumps({"error": f"bad credentials: {auth}"}).encode()
                    return self.send(hub.fail_with, echo, {"X-Error-Message": f"bad credentials: {auth}"})
                if self.path.startswith(f"/api/models/{hub.repo}/revision/"):
                    info = {"id": hub.repo, "sha": hub.sha, "siblings": [{"rfilename": n} for n in hub.files]}
                    return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                if self.path.startswith(f"/api/models/{hub.repo}/tree/"):
                    tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for n, b in hub.files.items()]  # fmt: skip
                    return self.send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                prefix = f"/{hub.repo}/resolve/{hub.sha}/"
                if self.path.startswith(prefix) and self.path[len(prefix) :] in hub.files:
                    body = hub.files[self.path[len(prefix) :]]
                    etag = f'"{hashlib.sha256(body).hexdigest()}"'
                    return self.send(200, body, {"X-Repo-Commit": hub.sha, "ETag": etag})
                self.send(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _online(hub: FakeHub, tmp_path: Path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": TOKEN,
            "MLX_VIT_CACHE": str(tmp_path / "mlx-vit"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}  # fmt: skip


def test_only_weights_and_json_are_downloaded_and_tokens_never_shown(vit_folder, tmp_path):
    files = {p.name: p.read_bytes() for p in vit_folder.iterdir()}
    code = {
        "modeling_vit.py": b"import os; os.system('touch MARKER')",
        "custom_pipeline.py": b"",
        "tokenizer.pkl": b"x",
        "setup.sh": b"",
        "pytorch_model.bin": b"not fetched: safetensors are there",
    }
    with FakeHub({**files, **code, "README.md": b"# model"}) as hub:
        photo = IMAGES / "chelsea.png"
        env = _online(hub, tmp_path)
        done = run_cli("classify", photo, "-m", "org/model", "--format", "json", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if "/resolve/" in path}
        assert fetched == {"config.json", "preprocessor_config.json", "model.safetensors"}
        local = run_cli("classify", photo, "-m", vit_folder, "--format", "json", env=env)
        assert json.loads(done.stdout)[0]["predictions"] == json.loads(local.stdout)[0]["predictions"]
        assert TOKEN not in done.stdout + done.stderr

        # Failures answered by a server that echoes the token back in its error body and headers.
        for status, debug in ((401, []), (403, []), (500, []), (401, ["--debug"])):
            hub.fail_with = status
            done = run_cli(*debug, "classify", photo, "-m", "org/other", env=env, cwd=tmp_path)
            assert done.returncode == 1 and TOKEN not in done.stdout + done.stderr, (status, done.stderr)
            if not debug:
                assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "MARKER").exists()


def test_redact_removes_the_token_wherever_it_comes_from(monkeypatch, tmp_path):
    from mlx_vit.hub import _redact

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert _redact(f"401: Bearer {TOKEN} ({TOKEN})") == "401: Bearer <token> (<token>)"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # a token saved by `hf auth login`
    (tmp_path / "token").write_text("hf_SAVEDtoken123")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    assert _redact("echo hf_SAVEDtoken123") == "echo <token>"


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b/c", "org/..", "..", "/abs/path", "org//name", "org/na me", "org/name\n", "org/name.git", "-org/x",
     "org/" + "x" * 97, "org/n@me", "org/name;rm -rf", "ørg/name", ""],
)  # fmt: skip
def test_invalid_repo_ids_never_reach_the_network(tmp_path, monkeypatch, name):
    from mlx_vit import hub

    with FakeHub({}) as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        _one_line_error(ModelNotFoundError, hub.download, name)
        assert server.requests == []


@pytest.mark.parametrize("revision", ["../../etc/passwd", "/abs", "main\n", "a b", "x" * 300, "refs/../main", ""])
def test_invalid_revisions_never_reach_the_network(tmp_path, monkeypatch, revision):
    from mlx_vit import hub

    with FakeHub({}) as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        message = _one_line_error(ModelNotFoundError, hub.download, "org/model", revision)
        assert "is not a valid revision" in message
        assert server.requests == []


def test_valid_revisions_are_accepted():
    from mlx_vit.hub import is_revision

    for revision in ("main", "v1.0", "refs/pr/1", "a" * 40, "feature/x-y_z"):
        assert is_revision(revision), revision


@pytest.mark.parametrize("offline", ["1", "0"])
def test_nothing_cached_and_no_hub_is_one_line(tmp_path, offline):
    with socket_closed_port() as port:
        env = {"HF_HOME": str(tmp_path / "hf"), "MLX_VIT_CACHE": str(tmp_path / "c"), "HF_HUB_OFFLINE": offline,
               "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN, "HF_HUB_ETAG_TIMEOUT": "3"}  # fmt: skip
        done = run_cli("classify", IMAGES / "chelsea.png", "-m", "org/absent", env=env)
    assert done.returncode == 1
    assert done.stderr == (
        "error: org/absent: not in the Hugging Face cache and the Hub cannot be reached (offline?); "
        "connect once, or pass a local folder with -m\n"
    )
    assert TOKEN not in done.stdout


class socket_closed_port:
    """A local port with nothing listening (connections are refused at once)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass


# ==========================================================================================================
# 2. Images


def _png_header_only(path: Path, width: int, height: int, mode_bytes: bytes = b"\x08\x02") -> Path:
    """A PNG that declares width x height (8-bit RGB) and holds one tiny, incomplete IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">II", width, height) + mode_bytes + b"\x00\x00\x00"
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _patched(source: bytes, offset: int, fmt: str, *values) -> bytes:
    raw = bytearray(source)
    struct.pack_into(fmt, raw, offset, *values)
    return bytes(raw)


def _saved(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **kwargs)
    return buffer.getvalue()


SMALL = Image.open(IMAGES / "chelsea.png").convert("RGB").resize((40, 30))


def _bombs() -> dict[str, bytes]:
    jpeg = _saved(SMALL, "JPEG")
    sof = jpeg.index(b"\xff\xc0")
    gif = _saved(SMALL.convert("P"), "GIF")
    bmp = _saved(SMALL, "BMP")
    tiff = _saved(SMALL, "TIFF")
    webp = _saved(SMALL, "WEBP", lossless=True)
    return {
        "gif 65535x65535": _patched(gif, 6, "<HH", 65535, 65535),
        "jpeg 65500x65500": _patched(jpeg, sof + 5, ">HH", 65500, 65500),
        "bmp 100000x100000": _patched(bmp, 18, "<ii", 100_000, 100_000),
        "tiff 30000x30000": tiff.replace(
            struct.pack("<HHII", 256, 4, 1, 40), struct.pack("<HHII", 256, 4, 1, 30000)
        ).replace(struct.pack("<HHII", 257, 4, 1, 30), struct.pack("<HHII", 257, 4, 1, 30000)),
        "webp 16383x16383 (VP8L)": webp[:21] + _vp8l_size(webp[21:25], 16383, 16383) + webp[25:],
    }


def _vp8l_size(bits: bytes, width: int, height: int) -> bytes:
    value = int.from_bytes(bits, "little")
    value = (value & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    return value.to_bytes(4, "little")


@pytest.mark.parametrize("bomb", list(_bombs()))
def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch, bomb):
    raw = _bombs()[bomb]
    path = tmp_path / f"bomb.{bomb.split()[0]}"
    path.write_bytes(raw)
    with monkeypatch.context() as unlimited:
        unlimited.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(path) as declared:  # the file really declares those dimensions
            assert declared.width * declared.height > DEFAULT_MAX_PIXELS, declared.size
    assert len(raw) < 20_000
    message = _one_line_error(ImageError, open_image, path, names=path)
    assert "over the limit of 178,956,970" in message or "decompression bomb" in message, message


def test_pixel_limit_is_configurable_never_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    big = _png_header_only(tmp_path / "200mp.png", 20_000, 10_000)  # 2e8: over Pillow's own threshold
    message = _one_line_error(ImageError, open_image, big)  # Pillow's own check says it first, in its words
    assert "refused as a decompression bomb (Image size (200000000 pixels) exceeds limit of 178956970" in message
    # A higher limit lets it through the size check (and Pillow's) to the decoder, which finds it truncated.
    message = _one_line_error(ImageError, open_image, big, max_pixels=250_000_000, names=big)
    assert "cannot decode image" in message and "over the limit" not in message
    # Lower limits refuse smaller images; the limit is inclusive.
    photo = IMAGES / "chelsea.png"  # 451 x 300
    assert "451x300 pixels is over the limit of 135,299" in _one_line_error(ImageError, open_image, photo,
                                                                            max_pixels=135_299)  # fmt: skip
    assert open_image(photo, max_pixels=135_300).size == (451, 300)
    for disabled in (0, -1, None, 1.5, True):
        with pytest.raises(ValueError):
            set_max_pixels(disabled)
    for disabled in (0, -1, 2.0):
        with pytest.raises(ValueError):
            open_image(photo, max_pixels=disabled)
    set_max_pixels(100_000)
    try:
        _one_line_error(ImageError, open_image, photo, names=photo)
    finally:
        set_max_pixels(DEFAULT_MAX_PIXELS)
    assert open_image(photo).size == (451, 300)


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    """Real broken files of every kind, written to tmp_path."""
    files = {}

    def write(name: str, raw: bytes) -> None:
        files[name] = tmp_path / name
        files[name].write_bytes(raw)

    for name, raw in {
        "png": (IMAGES / "chelsea.png").read_bytes(),
        "jpg": (IMAGES / "rocket.jpg").read_bytes(),
        "gif": _saved(SMALL.convert("P"), "GIF"),
        "tif": _saved(SMALL, "TIFF"),
        "webp": _saved(SMALL, "WEBP"),
        "bmp": _saved(SMALL, "BMP"),
    }.items():
        write(f"truncated-half.{name}", raw[: len(raw) // 2])
        write(f"truncated-header.{name}", raw[:20])
    write("empty.jpg", b"")
    write("text.png", b"just some text\nwith lines\n")
    write("random.jpg", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    write("html.jpg", b"<!DOCTYPE html><html><body>404 not found</body></html>")
    write("svg.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    write("ghostscript.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(x) print\nshowpage\n")
    write("pdf.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    png = bytearray((IMAGES / "chelsea.png").read_bytes())
    png[40:48] = b"\x00" * 8  # inside IHDR / the first chunk: bad CRC
    write("bad-crc.png", bytes(png))
    write("zero-size.png", _png_header_only(tmp_path / "z.png", 0, 0).read_bytes())
    files["missing.png"] = tmp_path / "missing.png"
    files["folder.jpg"] = tmp_path / "folder.jpg"
    files["folder.jpg"].mkdir()
    return files


def test_broken_files_are_one_line_errors_naming_the_file(tmp_path):
    for name, path in _broken_files(tmp_path).items():
        message = _one_line_error(ImageError, open_image, path, names=path)
        assert message.startswith(f"{path}: "), (name, message)
    eps = tmp_path / "ghostscript.eps"
    assert "not an image in a format mlx-vit reads" in _one_line_error(ImageError, open_image, eps)


def test_file_names_with_control_characters_stay_on_one_line(tmp_path):
    path = tmp_path / "evil\nerror: fake.png"
    path.write_bytes(b"not an image")
    message = _one_line_error(ImageError, open_image, path)
    assert "evil\\nerror: fake.png" in message


# ---- every mode to correct RGB, from real files


def _write(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_cmyk_files(tmp_path):
    cmyk = np.zeros((6, 8, 4), dtype=np.uint8)
    cmyk[..., 0] = np.arange(8) * 30  # cyan ramp
    cmyk[..., 3] = np.arange(6)[:, None] * 40  # black ramp
    cmyk[0, 0] = (0, 255, 255, 0)  # red
    image = Image.frombytes("CMYK", (8, 6), cmyk.tobytes())
    for path in (_write(tmp_path / "cmyk.tif", image), _write(tmp_path / "cmyk.jpg", image, quality=100)):
        with Image.open(path) as raw:
            assert raw.mode == "CMYK", path
            stored = np.asarray(raw).astype(np.float64)
        got = np.asarray(open_image(path)).astype(np.float64)
        # (1 - C)(1 - K) per channel, the naive conversion transformers' processors also use
        c, k = stored[..., :3], stored[..., 3:]
        expected = (255 - c) * (255 - k) / 255
        assert np.abs(got - expected).max() <= 1, path
    assert tuple(open_image(tmp_path / "cmyk.tif").getpixel((0, 0))) == (255, 0, 0)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_grayscale_files_are_scaled(tmp_path, suffix):
    values = (np.arange(64 * 16).reshape(16, 64) * 64).astype(np.uint16)  # 0 .. 65472
    path = _write(tmp_path / f"gray16.{suffix}", Image.fromarray(values))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16"), raw.mode
    got = np.asarray(open_image(path))
    expected = np.round(values / 257).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(expected[..., None], 3, axis=2))
    assert got.max() == 255 and got.min() == 0 and len(np.unique(got)) == 256  # scaled, not clipped


def test_16_bit_grayscale_with_a_transparent_value(tmp_path):
    values = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    path = _write(tmp_path / "trns16.png", Image.fromarray(values), transparency=30000)
    with Image.open(path) as raw:
        assert raw.mode == "I;16" and raw.info["transparency"] == 30000
    got = np.asarray(open_image(path))[0, :, 0]
    assert got.tolist() == [0, 4, 255, 255]  # the transparent pixel is white; 65535 is white anyway


def test_bitonal_la_and_palette_files(tmp_path):
    bits = np.zeros((5, 9), dtype=bool)
    bits[::2, 1::3] = True
    for suffix in ("png", "bmp", "tif"):
        path = _write(tmp_path / f"bits.{suffix}", Image.fromarray(bits))
        with Image.open(path) as raw:
            assert raw.mode == "1", (suffix, raw.mode)
        np.testing.assert_array_equal(np.asarray(open_image(path))[..., 1], np.where(bits, 255, 0))
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    alpha = np.array([[0, 64, 128, 255]] * 3, dtype=np.uint8)
    path = _write(tmp_path / "la.png", Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]))
    expected = gray * (alpha / 255) + 255 * (1 - alpha / 255)  # over white
    assert np.abs(np.asarray(open_image(path))[..., 0] - expected).max() <= 1
    # A palette PNG whose tRNS gives partial alpha per index
    palette = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255, 10, 20, 30])
    path = _write(tmp_path / "trns.png", palette, transparency=bytes([0, 128, 255]))
    got = np.asarray(open_image(path))[0].astype(int)
    assert got[0].tolist() == [255, 255, 255] and got[2].tolist() == [10, 20, 30]
    assert np.abs(got[1] - [127, 127, 255]).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", ["jpg", "png", "webp", "tif"])
def test_every_exif_orientation_in_every_format(tmp_path, orientation, suffix):
    source = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"jpg": dict(quality=100, subsampling=0), "webp": dict(lossless=True)}.get(suffix, {})
    path = _write(tmp_path / f"o{orientation}.{suffix}", source, exif=exif, **options)
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    got = np.asarray(open_image(path))
    np.testing.assert_array_equal(got, expected)
    assert got.shape[:2] == ((10, 6) if orientation >= 5 else (6, 10))
    if suffix != "jpg":  # lossless: compare with the hand-made transform of the source too
        turns = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
                 5: lambda a: np.transpose(a, (1, 0, 2)), 6: lambda a: np.rot90(a, -1),
                 7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2), 8: lambda a: np.rot90(a, 1)}  # fmt: skip
        np.testing.assert_array_equal(got, turns[orientation](np.asarray(source)))


def test_corrupt_exif_shows_the_image_as_stored(tmp_path):
    good = _saved(SMALL, "JPEG", quality=95)
    exif_segment = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 8) + b"Exif\x00\x00" + b"II*\x00\xff\xff\xff\x7f"
    path = tmp_path / "bad-exif.jpg"
    path.write_bytes(good[:2] + exif_segment + good[2:])  # an IFD offset far past the end
    with Image.open(io.BytesIO(good)) as stored:
        expected = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_image(path)), expected)


def test_first_frame_of_animations_and_multipage_files(tmp_path):
    colors = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    frames = [Image.new("RGB", (8, 6), c) for c in colors]
    for suffix, options in {"gif": {}, "webp": {"lossless": True}, "png": {}, "tif": {}}.items():
        path = _write(tmp_path / f"anim.{suffix}", frames[0], save_all=True, append_images=frames[1:], **options)
        with Image.open(path) as raw:
            assert getattr(raw, "n_frames", 1) == 3, suffix
        got = np.asarray(open_image(path)).reshape(-1, 3)
        assert np.abs(got.astype(int) - colors[0]).max() <= 2, (suffix, got[0])
    with Image.open(IMAGES / "multipage.tif") as raw:
        first = np.asarray(raw.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_image(IMAGES / "multipage.tif")), first)


def test_lab_tiff_is_not_read_as_transparent(tmp_path):
    lab = Image.new("LAB", (4, 4), (136, 208, 195))  # sRGB red, in 8-bit CIELAB
    path = _write(tmp_path / "lab.tif", lab)
    with Image.open(path) as raw:
        assert raw.mode == "LAB"
    got = np.asarray(open_image(path)).astype(int)
    assert np.abs(got - (255, 0, 0)).max() <= 12  # not composited on white by its "A" (a*) band


def test_heic_decodes_with_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    source = SMALL.resize((64, 48))
    path = tmp_path / "photo.heic"
    pillow_heif.from_pillow(source).save(path, quality=95)
    assert path.read_bytes()[4:12] == b"ftypheic"
    got = np.asarray(open_image(path)).astype(int)
    assert got.shape == (48, 64, 3) and np.abs(got - np.asarray(source)).mean() < 4  # lossy HEVC


def test_heic_without_pillow_heif_says_how_to_get_it(tmp_path, monkeypatch):
    from mlx_vit import preprocess as module

    header = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(header)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if it were not installed
    monkeypatch.setattr(module, "_heif_ready", False)
    message = _one_line_error(ImageError, open_image, path, names=path)
    assert "HEIC/HEIF image" in message and "pip install 'mlx-vit[heif]'" in message
    # AVIF shares the box (and the mif1 brand) but Pillow reads it: no hint, a real decode.
    avif = _write(tmp_path / "x.avif", SMALL)
    assert open_image(avif).size == SMALL.size


def test_extreme_aspect_ratio_resizes_only_the_crop_window(monkeypatch):
    """A 1-pixel strip under a shortest-edge resize would become gigapixels: only the crop window is resized.

    (Pillow's resize of a window is not bit-identical to cropping its full resize, so this path is only taken
    past RESIZE_WINDOW_ABOVE pixels, which no photo reaches under a real preprocessor config.)"""
    from mlx_vit import preprocess as module

    config = PreprocessConfig.from_hf({"size": {"shortest_edge": 64}, "do_center_crop": True,
                                       "crop_size": {"height": 56, "width": 48}, "resample": 3}, "deit")  # fmt: skip
    line = Image.new("RGB", (2_000_000, 1), (9, 99, 199))  # would resize to 128,000,000 x 64
    pixels = preprocess(line, config)
    expected = (np.array([9, 99, 199]) / 255 - 0.5) / 0.5
    assert pixels.shape == (56, 48, 3) and np.abs(pixels - expected).max() < 1e-6
    # On a smooth image the window gives (nearly) the pixels of the full resize.
    ramp = np.linspace(0, 255, 900)[None, :, None] * np.ones((7, 1, 3))
    strip = Image.fromarray(ramp.astype(np.uint8))
    full = preprocess(strip, config)  # 8228 x 64, the ordinary way
    monkeypatch.setattr(module, "RESIZE_WINDOW_ABOVE", 1000)
    assert np.abs(preprocess(strip, config) - full).max() <= 2 / 127.5


def test_to_rgb_keeps_ordinary_rgb_images():
    assert to_rgb(SMALL) is SMALL


# ==========================================================================================================
# 2. Images through the CLI: good photos classified, every bad file reported, exit 1


def test_batch_with_broken_files(vit_folder, tmp_path, isolated):
    good = [IMAGES / "chelsea.png", IMAGES / "rocket.jpg", IMAGES / "camera.png", IMAGES / "horse.png"]
    broken = _broken_files(tmp_path)
    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(_bombs()["gif 65535x65535"])
    bad = [*broken.values(), bomb]
    inputs = [good[0], *bad[: len(bad) // 2], good[1], good[2], *bad[len(bad) // 2 :], good[3]]
    done = run_cli("classify", *inputs, "-m", vit_folder, "--format", "json", "--batch-size", "2", env=isolated)
    assert done.returncode == 1, done.stderr
    results = json.loads(done.stdout)
    assert [r["path"] for r in results] == [str(p) for p in inputs]
    errors = [line for line in done.stderr.splitlines() if line]
    assert len(errors) == len(bad) and "Traceback" not in done.stderr
    for path, line in zip([p for p in inputs if p in bad], errors, strict=True):
        assert line.startswith(f"error: {path}: "), line
    alone = run_cli("classify", *good, "-m", vit_folder, "--format", "json", env=isolated)
    assert alone.returncode == 0
    expected = {r["path"]: r["predictions"] for r in json.loads(alone.stdout)}
    for result in results:
        if Path(result["path"]) in good:  # batches of a different size: equal up to float rounding
            ours, alone_ = result["predictions"], expected[result["path"]]
            assert [p["class_id"] for p in ours] == [p["class_id"] for p in alone_]
            assert np.allclose([p["score"] for p in ours], [p["score"] for p in alone_], atol=1e-5)
        else:
            assert result["error"].startswith(f"{result['path']}: ")


def test_max_pixels_option(vit_folder, isolated):
    tiny, cat = IMAGES / "no_time_for_that_tiny.gif", IMAGES / "chelsea.png"  # 350 and 135,300 pixels
    done = run_cli("classify", tiny, cat, "-m", vit_folder, "--max-pixels", "100000", "--format", "jsonl",
                   env=isolated)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == f"error: {cat}: 451x300 pixels is over the limit of 100,000 (a decompression bomb?)\n"
    assert "predictions" in json.loads(done.stdout.splitlines()[0])
    assert run_cli("classify", cat, "-m", vit_folder, "--max-pixels", "0", env=isolated).returncode == 2


def test_cli_default_pixel_limit_is_pillows():
    import inspect

    from mlx_vit import cli

    assert inspect.signature(cli.classify).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
