"""Hostile and broken checkpoints, configs and Hub answers: every case is refused with a one-line typed error naming
the file, and nothing in it runs or is imported. Images are in tests/test_images.py, converted folders and the
limits of the pickle machine in tests/test_hostile_models.py.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import IMAGES, one_line_error, run_cli

from mlx_vit.convert import pickle_machine, transformers_vit
from mlx_vit.convert import torch_pickle as tp
from mlx_vit.convert.checkpoint import read_checkpoint
from mlx_vit.convert.safetensors_io import read_safetensors
from mlx_vit.errors import CheckpointError, ConfigError, ModelNotFoundError, shown

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
    message = one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
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
    message = one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    assert "refusing global importlib.import_module" in message


def test_memo_games(tmp_path, unimported):
    # A refused global is refused where it is named: memoizing it and getting it back never gets that far.
    evil = b"\x80\x02cantigravity\ngeohash\nq\x00h\x00(tR."
    message = one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / "a.bin", evil))
    assert "refusing global antigravity.geohash" in message
    # The same through MEMOIZE and BINGET in protocol 4.
    evil = b"\x80\x04\x8c\x0bantigravity\x8c\x07geohash\x93\x94h\x00)R."
    message = one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / "b.bin", evil))
    assert "refusing global antigravity.geohash" in message
    # Getting what was never put, or a memo index past anything, is malformed, not a crash.
    for i, bad in enumerate([b"\x80\x02h\x05.", b"\x80\x02j\xff\xff\xff\xff.", b"\x80\x02g7\n."]):
        message = one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / f"m{i}.bin", bad))
        assert "malformed" in message
    # An allowlisted object fetched from the memo still cannot be modified (BUILD) or misused.
    for i, bad in enumerate([
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00h\x00N}X\x0e\x00\x00\x00__kwdefaults__}ss\x86b.",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00h\x00}X\x03\x00\x00\x00zzzK\x01sb.",
        b"\x80\x02ccollections\nOrderedDict\nq\x00h\x00}X\x03\x00\x00\x00zzzK\x01sb.",
        b"\x80\x02ctorch\nFloatStorage\nq\x00h\x00(tR.",  # calling a storage type
        b"\x80\x02ctorch\nFloatStorage\nq\x00h\x00)\x81.",  # NEWOBJ on it
    ]):  # fmt: skip
        one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / f"b{i}.bin", bad))
    assert not hasattr(pickle_machine.rebuild_tensor, "zzz") and pickle_machine.rebuild_tensor.__kwdefaults__ is None
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
        message = one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
        assert "refusing global antigravity.geohash (copyreg extension 240)" in message
        # Even when the process has already resolved that code once (copyreg caches it, and the C unpickler would
        # then skip find_class), the allowlist holds.
        copyreg._extension_cache[0xF0] = print
        message = one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
        assert "refusing global antigravity.geohash" in message
    finally:
        copyreg._extension_cache.pop(0xF0, None)
        copyreg.remove_extension("antigravity", "geohash", 0xF0)
    message = one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)  # unregistered code
    assert "refusing global ?.extension code 240" in message


def test_refused_names_are_shown_on_one_line(tmp_path):
    payload = b"\x80\x04\x8c\x0bos\nFAKE: ok\x8c\x06system\x93."
    message = one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / "n.bin", payload))
    assert "refusing global os\\nFAKE: ok.system" in message
    long_name = "x" * 10_000
    payload = b"\x80\x04X" + struct.pack("<I", len(long_name)) + long_name.encode() + b"\x8c\x01y\x93."
    message = one_line_error(CheckpointError, tp.read_torch_bin, _torch_zip(tmp_path / "l.bin", payload))
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
        archive.writestr("archive/version", "3\n")
        for name, raw in members.items():
            archive.writestr(f"archive/{name}", raw, compress_type=compress)
    return path


def test_storage_sizes_are_checked_against_the_archive_before_reading(tmp_path):
    four = np.arange(4, dtype="<f4").tobytes()
    # A numel far beyond the member: refused from the zip directory, without reading or allocating.
    path = _crafted(tmp_path / "huge.bin", {"w": _TensorRef(_StorageRef("0", 2**60), 0, (1,), (1,))}, {"data/0": four})
    message = one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    assert "16 bytes, 1152921504606846976 elements declared" in message
    # A storage key that walks out of data/ only finds nothing in the archive (it never touches the disk).
    path = _crafted(tmp_path / "walk.bin", {"w": _TensorRef(_StorageRef("../../../etc/passwd", 1), 0, (1,), (1,))},
                    {"data/0": four})  # fmt: skip
    assert "missing from the archive" in one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    # A compressed storage whose member inflates to megabytes: refused from the directory, as torch.load refuses a
    # record of another size than its elements, before a byte is inflated.
    bomb = four + bytes(8 * 2**20)
    path = _crafted(tmp_path / "bomb.bin", {"w": _TensorRef(_StorageRef("0", 4), 1, (3,), (1,))}, {"data/0": bomb},
                    compress=zipfile.ZIP_DEFLATED)  # fmt: skip
    assert path.stat().st_size < 100_000
    assert "8388624 bytes, 4 elements declared" in one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)


def test_oversized_data_pkl_and_byteorder_are_refused(tmp_path, monkeypatch):
    real = tmp_path / "real.bin"
    torch.save({f"w{i}": torch.ones(1) for i in range(50)}, real)
    monkeypatch.setattr(tp, "MAX_PICKLE_BYTES", 1000)
    message = one_line_error(CheckpointError, tp.read_torch_bin, real, names=real)
    assert "data.pkl is" in message and "limit 1000" in message
    path = tmp_path / "byteorder.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", b"little" * 1000, compress_type=zipfile.ZIP_DEFLATED)
    assert "byteorder is 6000 bytes" in one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)


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
    assert "names 'a' twice" in one_line_error(CheckpointError, read_safetensors, path, names=path)
    for i, metadata in enumerate([b"[1]", b'{"k": 1}', b'{"k": {"nested": "x"}}']):
        path = _st(tmp_path / f"meta{i}.safetensors", b'{"__metadata__": ' + metadata + b"}")
        assert "__metadata__" in one_line_error(CheckpointError, read_safetensors, path, names=path)
    assert read_safetensors(_st(tmp_path / "null.safetensors", b'{"__metadata__": null}')) == {}  # as serde reads it


# ==========================================================================================================
# 1. Checkpoints: config.json


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
    "image_size 10^6": (dict(image_size=10**6), "image_size 1000000 at patch_size 8 makes 15,625,000,001 tokens"),
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
    "model_type long": (dict(model_type="x" * 10_000), f"model_type {shown('x' * 10_000, 40, quote=True)} is not"),
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

    monkeypatch.setattr(transformers_vit, "read_weights", no_weights)
    message = one_line_error(ConfigError, read_checkpoint, hf_copy, names=path)
    assert needle in message, message
    assert len(message) < 400  # bounded: the path, a value cut at 40 characters, and the formats mlx-vit reads


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
    message = one_line_error(ConfigError, read_checkpoint, hf_copy, names=hf_copy / "config.json")
    assert needle in message, message


def test_config_json_too_large(hf_copy, monkeypatch):
    from mlx_vit import files

    monkeypatch.setattr(files, "MAX_JSON_BYTES", 100)
    message = one_line_error(ConfigError, read_checkpoint, hf_copy, names=hf_copy / "config.json")
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
        ({"image_std": 0}, "image_std must be positive, got [0.0, 0.0, 0.0]"),
        ({"image_std": [0.5, -0.5, 0.5]}, "image_std must be positive"),
        ({"image_std": 1e300}, "image_mean and image_std must fit float32"),
        ({"rescale_factor": 1e300}, "rescale_factor must be above 0 and at most 1 (usually 1/255), got 1e+300"),
        ({"rescale_factor": 0}, "rescale_factor must be above 0"),
        ({"image_std": 1e-9}, "makes pixel values up to 5e+08, over the limit of 10,000 (a wrong rescale_factor"),
        ({"do_rescale": False, "image_mean": 0, "image_std": 0.01}, "makes pixel values up to 2.55e+04"),
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
    message = one_line_error(ConfigError, read_checkpoint, hf_copy, names=path)
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
        message = one_line_error(ConfigError, load, str(out), names=out if "model" in changes else "config.json")
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
        one_line_error(ModelNotFoundError, hub.download, name)
        assert server.requests == []


@pytest.mark.parametrize("revision", ["../../etc/passwd", "/abs", "main\n", "a b", "x" * 300, "refs/../main", ""])
def test_invalid_revisions_never_reach_the_network(tmp_path, monkeypatch, revision):
    from mlx_vit import hub

    with FakeHub({}) as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        message = one_line_error(ModelNotFoundError, hub.download, "org/model", revision)
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
        "connect once, or pass a local folder with -m (`mlx-vit convert` makes a model folder from a downloaded "
        "checkpoint folder; -m random:vit-tiny-patch16-224 tries mlx-vit offline)\n"
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
