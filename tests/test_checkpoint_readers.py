"""The untrusted-input checkpoint readers: the allowlist torch unpickler and the validating safetensors one.

Both must return exactly the tensors that were saved, and on anything hostile or broken raise CheckpointError
with a one-line message naming the file -- never another exception type, and never run code.
"""

from __future__ import annotations

import builtins
import collections
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from mlx_vit.convert import timm_vit
from mlx_vit.convert.safetensors_io import read_header, read_safetensors
from mlx_vit.convert.torch_pickle import read_torch_bin
from mlx_vit.errors import CheckpointError


def _refused(reader, path: Path, *needles: str) -> str:
    """reader(path) raises CheckpointError with a one-line message naming the file and every needle."""
    with pytest.raises(CheckpointError) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# ----------------------------------------------------------------------------------------------------------
# torch: helpers


def _torch_save(obj, path: Path, **kwargs) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Copy a zip member by member, replacing some members' bytes and leaving some out."""
    replace = replace or {}
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            if info.filename in drop:
                continue
            new.writestr(info, replace.get(info.filename, old.read(info.filename)))
    return dst


def _member(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(suffix)]
    return name


def _with_pickle(tmp_path: Path, payload: bytes, name: str = "evil.bin") -> Path:
    """A real torch.save zip whose data.pkl is replaced by `payload`."""
    real = _torch_save({"w": torch.ones(2)}, tmp_path / "real.bin")
    return _rewrite_zip(real, tmp_path / name, replace={_member(real, "data.pkl"): payload})


class _Reduce:
    """Pickles as `func(*args)`: what a malicious checkpoint would run on an unrestricted torch.load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _StorageRef:
    def __init__(self, key: str, numel: int, storage_type: str = "FloatStorage"):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _TensorRef:
    """Pickles the way torch pickles a tensor, but with whatever offset, size and stride we choose."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, obj.storage_type), obj.key, "cpu", obj.numel)
        return None


def _craft_torch_zip(path: Path, obj, storages: dict[str, bytes], byteorder: str = "little") -> Path:
    """A torch-layout zip (archive/data.pkl, byteorder, data/<key>) around a crafted pickle."""
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


def _f32(*values: float, order: str = "<") -> bytes:
    return np.array(values, dtype=f"{order}f4").tobytes()


# ----------------------------------------------------------------------------------------------------------
# torch A1: round trips


def _assert_same(result: dict[str, np.ndarray], tensors: dict[str, torch.Tensor]) -> None:
    assert set(result) == set(tensors)
    for name, tensor in tensors.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = result[name]
        assert isinstance(got, np.ndarray), name
        assert got.dtype == expected.dtype, (name, got.dtype, expected.dtype)
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_torch_round_trip_dtypes_views_and_shapes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(3, 4, generator=generator)
    shared = torch.arange(10, dtype=torch.float32)
    tensors = {
        "f32": torch.randn(2, 3, generator=generator),
        "f64": torch.randn(5, generator=generator, dtype=torch.float64),
        "f16": torch.randn(4, 2, generator=generator).half(),
        "bf16": torch.randn(3, 5, generator=generator).bfloat16(),
        "bf16_t": torch.randn(3, 5, generator=generator).bfloat16().t(),
        "i64": torch.arange(-6, 6).reshape(3, 4),
        "i32": torch.tensor([-(2**31), 0, 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-(2**15), 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "transposed": matrix.t(),  # non-contiguous view
        "sliced": matrix[1:],  # storage offset 4
        "column": matrix[:, 2],  # offset and stride together
        "shared_a": shared[:4],  # two tensors on one storage
        "shared_b": shared[6:],
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "scalar_i64": torch.tensor(-7),
    }
    assert not tensors["transposed"].is_contiguous()
    assert tensors["sliced"].storage_offset() == 4
    assert tensors["shared_a"].untyped_storage().data_ptr() == tensors["shared_b"].untyped_storage().data_ptr()
    result = read_torch_bin(_torch_save(tensors, tmp_path / "pytorch_model.bin"))
    _assert_same(result, tensors)
    assert result["bf16"].dtype == np.float32
    assert result["scalar"].shape == () and result["scalar"] == 2.5
    assert result["empty"].shape == (0, 3)
    np.testing.assert_array_equal(result["shared_b"], [6.0, 7.0, 8.0, 9.0])
    # the returned arrays are independent copies, not views of one shared buffer
    assert not np.shares_memory(result["shared_a"], result["shared_b"])
    result["shared_a"][0] = 100.0
    np.testing.assert_array_equal(result["shared_b"], [6.0, 7.0, 8.0, 9.0])


def test_torch_bf16_is_widened_exactly(tmp_path):
    # bit patterns across the range: subnormals, +-0, +-inf, max, tiny and huge magnitudes
    bits = torch.tensor([0x0000, 0x8000, 0x0001, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x3F80, 0xC2F7], dtype=torch.int32)
    tensor = bits.to(torch.int16).view(torch.bfloat16)
    result = read_torch_bin(_torch_save({"x": tensor}, tmp_path / "bf16.bin"))
    assert result["x"].dtype == np.float32
    np.testing.assert_array_equal(result["x"], tensor.float().numpy())
    assert result["x"][3] == np.float32(tensor[3].float().item()) and np.signbit(result["x"][1])


def test_torch_module_state_dict_with_metadata(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.LayerNorm(4))
    model(torch.randn(5, 3))  # moves the batch-norm running statistics off their defaults
    state = model.state_dict()
    assert isinstance(state, collections.OrderedDict) and hasattr(state, "_metadata")
    result = read_torch_bin(_torch_save(state, tmp_path / "module.bin"))
    _assert_same(result, dict(state))
    assert list(result) == list(state)
    assert result["1.num_batches_tracked"].dtype == np.int64 and result["1.num_batches_tracked"] == 1


def test_torch_state_dict_wrapper_and_parameters(tmp_path):
    weights = {"w": torch.randn(2, 2), "b": torch.zeros(2, dtype=torch.float16)}
    wrapped = _torch_save({"state_dict": weights, "epoch": 3}, tmp_path / "wrapped.bin")
    _refused(read_torch_bin, wrapped, "does not hold a state dict")  # transformers reads a state dict itself
    _assert_same(read_torch_bin(wrapped, timm_vit.training_state_dict), weights)  # timm unwraps it
    parameter = torch.nn.Parameter(torch.tensor([1.5, -2.0]))
    result = read_torch_bin(_torch_save({"p": parameter}, tmp_path / "param.bin"))
    np.testing.assert_array_equal(result["p"], [1.5, -2.0])


def test_storages_past_the_budget_are_refused_before_they_are_read(tmp_path):
    """convert.common.weight_budget bounds what a model's checkpoint may hold: checked from the pickle's storage
    sizes (and a safetensors header's offsets) before any storage is read."""
    path = _torch_save({"w": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.float16)}, tmp_path / "w.bin")
    assert set(read_torch_bin(path, budget=4020)) == {"w", "b"}
    _refused(lambda p: read_torch_bin(p, budget=4019), path, "tensors take 4,020 bytes, more than its model could use")


def test_the_budget_is_for_all_shards_together(tmp_path):
    from mlx_vit.convert.common import read_weights

    safetensors.numpy.save_file({"a": np.zeros(100, np.float32)}, tmp_path / "one.safetensors")
    safetensors.numpy.save_file({"b": np.zeros(100, np.float32)}, tmp_path / "two.safetensors")
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(read_weights(tmp_path, budget=800)) == {"a", "b"}
    with pytest.raises(CheckpointError, match="more than its model could use"):
        read_weights(tmp_path, budget=799)  # each shard alone is within it


def test_crafted_zip_little_and_big_endian(tmp_path):
    little = _craft_torch_zip(tmp_path / "le.bin", {"x": _TensorRef(_StorageRef("0", 3), 0, (3,), (1,))},
                              {"0": _f32(1.0, -2.5, 3.25)})  # fmt: skip
    np.testing.assert_array_equal(read_torch_bin(little)["x"], [1.0, -2.5, 3.25])
    big = _craft_torch_zip(tmp_path / "be.bin", {"x": _TensorRef(_StorageRef("0", 3), 1, (2,), (1,))},
                           {"0": _f32(1.0, -2.5, 3.25, order=">")}, byteorder="big")  # fmt: skip
    result = read_torch_bin(big)["x"]
    np.testing.assert_array_equal(result, [-2.5, 3.25])
    assert result.dtype == np.float32 and result.dtype.isnative


# ----------------------------------------------------------------------------------------------------------
# torch A2: pickles that would run code


def _marker_payloads(marker: Path) -> list[tuple[str, object, tuple[str, ...]]]:
    """(id, object whose unpickling runs code that creates `marker`, names the refusal may give)."""
    return [
        ("os.system", _Reduce(os.system, f"touch {marker}"), ("posix.system", "os.system")),
        (
            "builtins.exec",
            _Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
            ("builtins.exec", "__builtin__.exec"),
        ),
        (
            "builtins.eval",
            _Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"),
            ("builtins.eval", "__builtin__.eval"),
        ),
        (
            "subprocess.Popen",
            _Reduce(subprocess.Popen, ["touch", str(marker)]),
            ("subprocess.Popen", "commands.Popen"),
        ),
        ("builtins.open", _Reduce(builtins.open, str(marker), "w"), ("io.open", "builtins.open")),
        ("torch.load", _Reduce(torch.storage._load_from_bytes, b"x"), ("torch.storage._load_from_bytes",)),
    ]


PAYLOAD_IDS = [payload_id for payload_id, _, _ in _marker_payloads(Path("m"))]


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload_id", PAYLOAD_IDS)
@pytest.mark.parametrize("nesting", ["top", "dict_value", "list_in_dict", "beside_tensor"])
def test_code_running_pickles_are_refused(tmp_path, payload_id, protocol, nesting):
    marker = tmp_path / "MARKER"
    (evil, names) = next((obj, names) for pid, obj, names in _marker_payloads(marker) if pid == payload_id)
    obj = {
        "top": evil,
        "dict_value": {"weight": evil},
        "list_in_dict": {"weights": [1, 2, evil]},
        "beside_tensor": {"w": torch.ones(2), "evil": evil},
    }[nesting]
    if nesting == "beside_tensor":  # a genuine torch pickle (storages and all) with the payload inside
        path = _torch_save(obj, tmp_path / "evil.bin", pickle_protocol=protocol)
        payload = zipfile.ZipFile(path).read(_member(path, "data.pkl"))
    else:
        payload = pickle.dumps(obj, protocol=protocol)
        path = _with_pickle(tmp_path, payload)
    # protocol 2 names globals with GLOBAL, protocol 4 with STACK_GLOBAL
    opcodes = {op.name for op, _, _ in pickletools.genops(payload)}
    assert ("STACK_GLOBAL" in opcodes) == (protocol == 4) and ("GLOBAL" in opcodes) == (protocol == 2)
    message = _refused(read_torch_bin, path, "refusing global")
    assert any(name in message for name in names), message
    assert not marker.exists()


@pytest.mark.parametrize("payload_id", PAYLOAD_IDS)
def test_bare_pickle_file_is_refused_as_legacy(tmp_path, payload_id):
    marker = tmp_path / "MARKER"
    evil = next(obj for pid, obj, _ in _marker_payloads(marker) if pid == payload_id)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"w": evil}, protocol=2))
    _refused(read_torch_bin, path, "not a zip-format", "legacy")
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"(S'touch MARKER'\nios\nsystem\n.", id="INST"),
        pytest.param(b"\x80\x02cos\nsystem\nq\x00X\x0e\x00\x00\x00touch MARKER\x85R.", id="GLOBAL+REDUCE"),
        pytest.param(b"\x80\x04\x8c\x02os\x8c\x06system\x93X\x0e\x00\x00\x00touch MARKER\x85R.", id="STACK_GLOBAL"),
        pytest.param(b"\x80\x02(cos\nsystem\nX\x0e\x00\x00\x00touch MARKER\x6f.", id="OBJ"),
    ],
)
def test_hand_written_opcodes_are_refused(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)  # "touch MARKER" would land here
    path = _with_pickle(tmp_path, payload)
    _refused(read_torch_bin, path, "os.system")
    assert not (tmp_path / "MARKER").exists()


def test_storage_types_cannot_be_rewritten_by_a_pickle(tmp_path):
    """BUILD on an allowlisted storage type must not change how later (legitimate) files are read."""
    attack = (
        b"\x80\x02ctorch\nFloatStorage\n"  # the allowlisted storage-type object itself
        b"}X\x04\x00\x00\x00nameX\x0f\x00\x00\x00BFloat16Storages"  # {"name": "BFloat16Storage"}
        b"b0"  # BUILD (sets attributes on it), POP
        b"ctorch\nFloatStorage\n"
        b"(NX\x04\x00\x00\x00nameX\x0f\x00\x00\x00BFloat16Storage}\x86b0"  # slot-state form of the same
        b"}."  # and return an empty dict
    )
    with pytest.raises(CheckpointError):
        read_torch_bin(_with_pickle(tmp_path, attack))
    good = _torch_save({"x": torch.tensor([1.0, -2.0, 3.5])}, tmp_path / "good.bin")
    np.testing.assert_array_equal(read_torch_bin(good)["x"], [1.0, -2.0, 3.5])


# ----------------------------------------------------------------------------------------------------------
# torch A3: malformed archives


def test_storage_missing_from_archive(tmp_path):
    real = _torch_save({"w": torch.ones(3)}, tmp_path / "real.bin")
    path = _rewrite_zip(real, tmp_path / "missing.bin", drop=(_member(real, "data/0"),))
    _refused(read_torch_bin, path, "missing from the archive")


def test_storage_shorter_than_declared(tmp_path):
    real = _torch_save({"w": torch.ones(3)}, tmp_path / "real.bin")
    member = _member(real, "data/0")
    path = _rewrite_zip(real, tmp_path / "short.bin", replace={member: b"\x00" * 11})
    _refused(read_torch_bin, path, "11 bytes", "3 elements")


@pytest.mark.parametrize(
    ("offset", "size", "stride", "needle"),
    [
        (4, (1,), (1,), "reaches element 4"),  # offset at the end of a 4-element storage
        (3, (2,), (1,), "reaches element 4"),  # runs one past the end
        (0, (2, 2), (3, 1), "reaches element 4"),  # a stride that steps past the end
        (0, (5,), (1,), "5 elements from a storage of 4"),
        (0, (2**33,), (0,), "elements from a storage of 4"),  # stride 0: would allocate 32 GiB
        (2**62, (1,), (1,), "past 2**62"),
        (2**62 - 1, (1,), (1,), "reaches element"),
        (-1, (1,), (1,), "invalid offset"),
        (0, (2,), (-1,), "negative"),
        (0, (-2,), (1,), "negative"),
        (0, (2, 2), (1,), "invalid offset"),  # size and stride of different lengths
        (0.0, (1,), (1,), "invalid offset"),
        (0, (True,), (1,), "invalid offset"),
        (0, (1,), ("1",), "invalid offset"),
    ],
)
def test_tensor_outside_its_storage(tmp_path, offset, size, stride, needle):
    tensor = _TensorRef(_StorageRef("0", 4), offset, size, stride)
    path = _craft_torch_zip(tmp_path / "bad.bin", {"w": tensor}, {"0": _f32(1, 2, 3, 4)})
    _refused(read_torch_bin, path, needle)


def test_tensor_on_the_last_element_is_fine(tmp_path):
    path = _craft_torch_zip(tmp_path / "ok.bin", {"w": _TensorRef(_StorageRef("0", 4), 1, (2, 2), (0, 2))},
                            {"0": _f32(1, 2, 3, 4)})  # fmt: skip
    np.testing.assert_array_equal(read_torch_bin(path)["w"], [[2, 4], [2, 4]])


@pytest.mark.parametrize(
    ("obj", "storages", "needle"),
    [
        ({"w": _TensorRef(5, 0, (1,), (1,))}, {}, "not a storage"),
        ({"w": _TensorRef(_StorageRef("0", -1), 0, (1,), (1,))}, {"0": b""}, "-1 elements"),
        ({"w": _TensorRef(_StorageRef(0, 1), 0, (1,), (1,))}, {"0": _f32(1)}, "malformed storage reference"),
        (
            {"w": _TensorRef(_StorageRef("0", 1.0), 0, (1,), (1,))},
            {"0": _f32(1)},
            "malformed storage reference",
        ),
        ([_TensorRef(_StorageRef("0", 1), 0, (1,), (1,))], {"0": _f32(1)}, "does not hold a state dict"),
        ({1: _TensorRef(_StorageRef("0", 1), 0, (1,), (1,))}, {"0": _f32(1)}, "does not hold a state dict"),
        ({"w": [1, 2]}, {}, "does not hold a state dict"),
        ({"state_dict": {"w": "text"}}, {}, "does not hold a state dict"),
    ],
)
def test_malformed_pickle_contents(tmp_path, obj, storages, needle):
    _refused(read_torch_bin, _craft_torch_zip(tmp_path / "bad.bin", obj, storages), needle)


def test_unexpected_persistent_id(tmp_path):
    payload = b"\x80\x02}X\x01\x00\x00\x00wX\x03\x00\x00\x00abcQs."  # BINPERSID on a plain string
    _refused(read_torch_bin, _with_pickle(tmp_path, payload), "unexpected persistent id")


def test_unknown_byte_order(tmp_path):
    path = _craft_torch_zip(tmp_path / "bo.bin", {"w": _TensorRef(_StorageRef("0", 1), 0, (1,), (1,))},
                            {"0": _f32(1)}, byteorder="middle")  # fmt: skip
    _refused(read_torch_bin, path, "byte order")


def test_random_bytes_and_empty_files(tmp_path):
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _refused(read_torch_bin, noise, "not a zip-format")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    _refused(read_torch_bin, empty, "not a zip-format")


def test_zip_without_data_pkl_or_version(tmp_path):
    """torch's reader looks in the folder of the directory's first member, for `version` and `data.pkl`."""
    path = tmp_path / "nopkl.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/data/0", b"\x00" * 4)
    _refused(read_torch_bin, path, "has no archive/data.pkl")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    _refused(read_torch_bin, path, "has no version record")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("b/version", "3\n")
        archive.writestr("a/version", "3\n")
        archive.writestr("a/data.pkl", pickle.dumps({}, protocol=2))
    _refused(read_torch_bin, path, "member 'a/version' is outside its folder b/")  # b/ comes first


def test_legacy_format_is_refused(tmp_path):
    path = _torch_save({"w": torch.ones(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    _refused(read_torch_bin, path, "legacy")


def test_zip_with_garbage_in_the_middle(tmp_path):
    real = _torch_save({"w": torch.arange(64.0)}, tmp_path / "real.bin")
    raw = bytearray(real.read_bytes())
    raw[30:60] = b"\xff" * 30  # the first local header and name, the directory at the end still intact
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(raw))
    _refused(read_torch_bin, path)


def _zip_member_data_span(path: Path, name: str) -> tuple[int, int]:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["deflate", "bzip2", "lzma"]
)
def test_corrupt_compressed_member(tmp_path, method):
    path = tmp_path / "compressed.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"a": list(range(200))}, protocol=2), compress_type=method)
    start, end = _zip_member_data_span(path, "archive/data.pkl")
    raw = bytearray(path.read_bytes())
    raw[start:end] = bytes((7 * i + 0xA5) & 0xFF for i in range(end - start))
    path.write_bytes(bytes(raw))
    _refused(read_torch_bin, path)


def test_encrypted_or_unknown_compression_member(tmp_path):
    real = _torch_save({"w": torch.ones(2)}, tmp_path / "real.bin")
    for flag, method in ((0x1, zipfile.ZIP_STORED), (0, 99)):
        path = tmp_path / f"odd-{flag}-{method}.bin"
        with zipfile.ZipFile(real) as old, zipfile.ZipFile(path, "w") as new:
            for info in old.infolist():
                new.writestr(info, old.read(info.filename))
            pkl = new.getinfo(_member(real, "data.pkl"))
            pkl.flag_bits |= flag  # the central directory, which is what reading trusts
            pkl.compress_type = method
        _refused(read_torch_bin, path)


# ----------------------------------------------------------------------------------------------------------
# safetensors: helpers


def _st_bytes(header, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def _st_file(tmp_path: Path, header, data: bytes = b"", header_len: int | None = None) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(_st_bytes(header, data, header_len))
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ----------------------------------------------------------------------------------------------------------
# safetensors B1: round trips


def test_safetensors_round_trip_numpy(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2)),
        "i64": np.arange(-4, 8, dtype=np.int64).reshape(2, 2, 3),
        "i32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "u8": np.array([0, 1, 254, 255], dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
    }
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "np"})
    result = read_safetensors(path)
    assert set(result) == set(tensors)
    for name, expected in tensors.items():
        assert result[name].dtype == expected.dtype, name
        assert result[name].shape == expected.shape, name
        np.testing.assert_array_equal(result[name], expected, err_msg=name)
        assert result[name].flags.writeable and result[name].flags.owndata  # copied out of the map
    header, data_start = read_header(path)
    assert set(header) == set(tensors)  # __metadata__ dropped
    assert data_start == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_safetensors_round_trip_bf16(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(4, 3, generator=generator).bfloat16(),
        "special": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3.0e38]).bfloat16(),
        "f32": torch.randn(2, generator=generator),
    }
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    result = read_safetensors(path)
    for name, tensor in tensors.items():
        assert result[name].dtype == np.float32, name
        np.testing.assert_array_equal(result[name], tensor.float().numpy(), err_msg=name)
    assert np.signbit(result["special"][1]) and np.isinf(result["special"][2])


def test_safetensors_hand_written_valid_file(tmp_path):
    data = np.array([1, 2], dtype="<i2").tobytes() + np.array([0.5], dtype="<f4").tobytes()
    header = {"b": _entry("F32", [1], 4, 8), "a": _entry("I16", [2], 0, 4), "__metadata__": {"k": "v"},
              "z": _entry("U8", [0, 5], 8, 8)}  # fmt: skip
    result = read_safetensors(_st_file(tmp_path, header, data))
    np.testing.assert_array_equal(result["a"], np.array([1, 2], dtype=np.int16))
    assert result["a"].dtype == np.int16
    np.testing.assert_array_equal(result["b"], [0.5])
    assert result["z"].shape == (0, 5)


# ----------------------------------------------------------------------------------------------------------
# safetensors B2: malformed files

F32_8 = b"\x00" * 8
MALFORMED = {
    "header_len_past_end": (dict(header={"a": _entry("F32", [2], 0, 8)}, data=F32_8, header_len=10_000),
                            "past the end"),
    "header_len_2_63": (dict(header={"a": _entry("F32", [2], 0, 8)}, data=F32_8, header_len=2**63),
                        "past the end"),
    "header_len_max": (dict(header=b"{}", header_len=2**64 - 1), "past the end"),
    "not_json": (dict(header=b"{not json"), "not valid JSON"),
    "not_utf8": (dict(header=b'{"\xff\xfe": 1}'), "not valid JSON"),
    "empty_header": (dict(header=b""), "not valid JSON"),
    "json_list": (dict(header=[1, 2, 3]), "not a JSON object"),
    "json_string": (dict(header="abc"), "not a JSON object"),
    "entry_not_object": (dict(header={"a": [1]}), "malformed header entry"),
    "entry_extra_key": (dict(header={"a": {**_entry("U8", [0], 0, 0), "x": 1}}), "malformed header entry"),
    "entry_missing_key": (dict(header={"a": {"dtype": "U8", "shape": [0]}}), "malformed header entry"),
    "unknown_dtype": (dict(header={"a": _entry("F8", [2], 0, 2)}, data=b"\x00\x00"), "unknown dtype 'F8'"),
    "lowercase_dtype": (dict(header={"a": _entry("f32", [2], 0, 8)}, data=F32_8), "unknown dtype"),
    "negative_shape": (dict(header={"a": _entry("F32", [-2], 0, 8)}, data=F32_8), "invalid shape"),
    "float_shape": (dict(header={"a": _entry("F32", [2.0], 0, 8)}, data=F32_8), "invalid shape"),
    "string_shape": (dict(header={"a": _entry("F32", ["2"], 0, 8)}, data=F32_8), "invalid shape"),
    "bool_shape": (dict(header={"a": _entry("U8", [True], 0, 1)}, data=b"\x00"), "invalid shape"),
    "shape_not_list": (dict(header={"a": _entry("F32", 2, 0, 8)}, data=F32_8), "invalid shape"),
    "offsets_past_end": (dict(header={"a": _entry("F32", [2], 0, 16)}, data=F32_8), "outside the file"),
    # A signed number is never an offset (the reference reads them unsigned).
    "offsets_negative": (dict(header={"a": _entry("F32", [2], -8, 0)}, data=F32_8), "invalid data_offsets"),
    "offsets_end_before_begin": (dict(header={"a": _entry("U8", [0], 8, 4)}, data=F32_8), "outside the file"),
    "offsets_three": (dict(header={"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}},
                           data=b"\x00"), "invalid data_offsets"),
    "offsets_float": (dict(header={"a": _entry("U8", [1], 0.0, 1)}, data=b"\x00"), "invalid data_offsets"),
    "shape_bytes_mismatch": (dict(header={"a": _entry("F32", [3], 0, 8)}, data=F32_8), "takes 12"),
    "overlap": (dict(header={"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [1], 4, 8)}, data=F32_8),
                "overlaps the previous tensor"),
    "duplicate_span": (dict(header={"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 0, 4)},
                            data=b"\0" * 4), "overlaps the previous tensor"),
    "gap": (dict(header={"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 4, 6)}, data=b"\0" * 6),
            "leaves a gap before it"),
    "gap_at_start": (dict(header={"a": _entry("U8", [2], 2, 4)}, data=b"\0" * 4), "leaves a gap before it"),
    "trailing_bytes": (dict(header={"a": _entry("F32", [2], 0, 8)}, data=F32_8 + b"xyz"),
                       "3 bytes after the last tensor"),
    "data_but_no_tensors": (dict(header={}, data=b"abc"), "3 bytes after the last tensor"),
    # found by the property tests (tests/test_fuzz.py); each escaped as a TypeError, ValueError, OverflowError or
    # RecursionError
    "dtype_unhashable": (dict(header={"a": _entry(["F32"], [0], 0, 0)}), "unknown dtype"),
    "json_int_too_long": (dict(header=b'{"a": ' + b"1" * 5000 + b"}"), "not valid JSON"),
    "json_too_deep": (dict(header=b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    "shape_overflows_int64": (dict(header={"a": _entry("U8", [2**64], 0, 0)}), "invalid shape"),
    "shape_wraps_to_zero": (dict(header={"a": _entry("U8", [2**32, 2**32], 0, 0)}), "invalid shape"),
    "shape_zero_with_huge_dim": (dict(header={"a": _entry("U8", [2**63, 0], 0, 0)}), "invalid shape"),
    "shape_too_many_dims": (dict(header={"a": _entry("U8", [1] * 65, 0, 1)}, data=b"\x00"), "invalid shape"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors(tmp_path, case):
    kwargs, needle = MALFORMED[case]
    path = _st_file(tmp_path, **kwargs)
    _refused(read_header, path, needle)
    _refused(read_safetensors, path, needle)


@pytest.mark.parametrize("span", [12, 4, 0])
def test_a_span_not_exactly_its_tensors_size_is_refused_by_the_header_check(tmp_path, span):
    """F32 [2] takes 8 bytes: a longer span (the file's other bytes otherwise in order) is refused by the header
    check, as the reference refuses it, not later as a file cut short; a shorter one too."""
    header = {"a": _entry("F32", [2], 0, span), "b": _entry("U8", [4], span, span + 4)}
    path = _st_file(tmp_path, header, b"\x01" * (span + 4))
    message = f"tensor 'a' spans {span} bytes (data_offsets 0..{span}), but its shape [2] of F32 takes 8"
    for reader in (read_header, read_safetensors):
        assert "cut short" not in _refused(reader, path, message)
    with pytest.raises(safetensors.SafetensorError, match="invalid shape, data type, or offset for tensor"):
        safetensors.numpy.load_file(path)


@pytest.mark.parametrize("content", [b"", b"\x00", b"\x01\x00\x00\x00\x00\x00\x00"])
def test_safetensors_shorter_than_8_bytes(tmp_path, content):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(content)
    _refused(read_safetensors, path, f"only {len(content)} bytes")


def test_safetensors_header_larger_than_cap(tmp_path):
    path = _st_file(tmp_path, b"{}", header_len=100 * 1024 * 1024 + 1)
    with open(path, "r+b") as f:  # a sparse file big enough to hold the declared header
        f.truncate(100 * 1024 * 1024 + 16)
    _refused(read_safetensors, path, "header length")
