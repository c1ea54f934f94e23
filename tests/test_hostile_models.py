"""Hostile models, round two: the classes of attack that got past the first round, each built as real files.

An out-of-bounds read through the unpickler, crashes by signal, hangs, memory far past the input's size,
tracebacks, silent wrong answers, terminal injection and unbounded messages. Every input must end in its result
or one line (`error: FILE: reason`) with exit code 1: no traceback, no hang, bounded memory, nothing run.
(Hostile images are in tests/test_images.py; the first round is in tests/test_hostile.py.)
"""

from __future__ import annotations

import copyreg
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import safetensors.numpy
from checkpoints import IMAGES, make_checkpoint, one_line_error, peak_mb, run_cli

from mlx_vit import config as config_module
from mlx_vit import model as model_module
from mlx_vit.classify import load
from mlx_vit.config import ViTConfig
from mlx_vit.convert import Quantize, convert
from mlx_vit.convert import torch_pickle as tp
from mlx_vit.errors import NAME_LIMIT, CheckpointError, ConfigError, MlxVitError, shown
from mlx_vit.loading import load_model

PHOTO = IMAGES / "chelsea.png"
CONTROL = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZWNobyBwd25lZA==\x07\x9b31m"  # title, clear screen, clipboard, C1 CSI


def cli_fails(*args, env: dict, needle: str = "") -> str:
    """`mlx-vit ARGS` exits 1 with exactly one `error:` line (containing `needle`) and no traceback."""
    done = run_cli(*args, env=env)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert needle in errors[0], errors[0]
    return errors[0]


BASELINE_MB = None


def baseline_mb() -> float:
    """Peak memory of reading nothing, with the same imports: what the bounds below are measured above."""
    global BASELINE_MB
    if BASELINE_MB is None:
        _, BASELINE_MB = peak_mb("import mlx_vit.convert.torch_pickle, mlx_vit.loading, mlx_vit.classify")
    return BASELINE_MB


def refused_in_child(reader: str, path: Path, setup: str = "", timeout: float = 120):
    """`reader(path)` (e.g. "mlx_vit.loading.load_model") in a fresh interpreter, after `setup`: (its run, which
    prints the MlxVitError message if it raised one, the seconds it took, its peak memory in MB over baseline_mb)."""
    module, name = reader.rsplit(".", 1)
    code = f"""
import importlib, time
from mlx_vit.errors import MlxVitError
{setup}
start = time.monotonic()
try:
    importlib.import_module({module!r}).{name}({str(path)!r})
except MlxVitError as error:
    print(str(error))
print(f"SECONDS {{time.monotonic() - start:.2f}}")
"""
    done, peak = peak_mb(code, timeout)
    seconds = float(done.stdout.split("SECONDS ")[1]) if "SECONDS " in done.stdout else float("inf")
    return done, seconds, peak - baseline_mb()


# ==========================================================================================================
# 1. The unpickler: nothing a pickle reaches is mutable; every pickle is parsed whole before anything runs


def torch_zip(path: Path, pickled: bytes, members: dict[str, bytes] | None = None, compress=zipfile.ZIP_STORED):
    """A torch.save-layout zip whose data.pkl is `pickled`, with storages data/<key>."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
        for key, raw in (members or {}).items():
            archive.writestr(f"archive/data/{key}", raw, compress_type=compress)
    return path


def text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    """A persistent id as torch writes it, then BINPERSID: pushes the storage."""
    return b"(" + text("storage") + f"ctorch\n{kind}\n".encode() + text(key) + text("cpu") + int4(numel) + b"tQ"


def int4(value: int) -> bytes:
    """BININT, or LONG1 for integers past 32 bits (as pickle writes them)."""
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tensor(storage_code: bytes, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def ints(values):
        return b"(" + b"".join(int4(v) for v in values) + b"t"

    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage_code + int4(offset) + ints(size) + ints(stride)
            + b"\x89ccollections\nOrderedDict\n)RtR")  # fmt: skip


def state_dict(*items: tuple[str, bytes]) -> bytes:
    return b"\x80\x02}(" + b"".join(text(k) + v for k, v in items) + b"u."


def test_building_on_a_storage_is_refused(tmp_path):
    """The storage a persistent id gives cannot be modified: BUILD swapped its array for a 2-D one, and the
    tensor rebuild then read past the buffer into the converting process's heap."""
    four = np.arange(4, dtype="<f4").tobytes()
    two_d = tensor(storage("1", 4), 0, (2, 2), (2, 1))  # a real 2-D tensor to put in the storage's place
    built = storage("0", 4) + b"}" + text("array") + two_d + b"sb"  # BUILD on the storage: {"array": 2-D}
    pickled = state_dict(("pos_embed", tensor(built, 0, (4,), (1,))))
    path = torch_zip(tmp_path / "pytorch_model.bin", pickled, {"0": four, "1": four})
    assert "refusing to modify" in one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    # The same file without the BUILD is a good checkpoint: the refusal is the BUILD's.
    good = torch_zip(tmp_path / "good.bin", state_dict(("w", tensor(storage("0", 4), 0, (4,), (1,)))), {"0": four})
    np.testing.assert_array_equal(tp.read_torch_bin(good)["w"], [0, 1, 2, 3])


@pytest.mark.parametrize("target", ["tensor", "parameter", "storage type", "OrderedDict holding tensors"])
def test_nothing_handed_out_can_be_built_on(tmp_path, target):
    code = {
        "tensor": tensor(storage("0", 4), 0, (4,), (1,)),
        "parameter": b"ctorch._utils\n_rebuild_parameter\n(" + tensor(storage("0", 4), 0, (4,), (1,)) + b"\x88tR",
        "storage type": b"ctorch\nFloatStorage\n",
        "OrderedDict holding tensors": b"ccollections\nOrderedDict\n)R",
    }[target]
    state = b"}" + text("array") + int4(1) + b"s" if target != "OrderedDict holding tensors" else int4(1)
    path = torch_zip(tmp_path / "x.bin", state_dict(("w", code + state + b"b")), {"0": bytes(16)})
    one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)


def test_a_pickle_pickletools_cannot_read_is_refused_even_with_a_cached_extension(tmp_path):
    """`I0x1` stops pickletools, while the C unpickler reads it in base 0 and goes on to an EXT1 opcode that
    copyreg's cache serves without asking find_class: in a process that had resolved that code, it ran."""
    calls = []
    copyreg.add_extension("mlx_vit_test_module", "gadget", 0xF3)
    copyreg._extension_cache[0xF3] = calls.append  # as if resolved before: what the C unpickler would call
    try:
        pickled = b"\x80\x02I0x1\n0\x82\xf3(" + text("ran") + b"tR."
        path = torch_zip(tmp_path / "ext.bin", pickled)
        message = one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
        assert "cannot be parsed" in message, message
        assert calls == []
    finally:
        copyreg._extension_cache.pop(0xF3, None)
        copyreg.remove_extension("mlx_vit_test_module", "gadget", 0xF3)


@pytest.mark.parametrize(
    "flood",
    [
        "empty lists",
        "empty tuples",
        "nested marks",
        "memo at 2^31",
        "memo gets",
        "one huge string",
        "deep tuple key",
        "colliding keys",
    ],
)
def test_pickle_floods_stay_small_and_fast(tmp_path, flood):
    """A pickle of a few MB built to make objects (7 GB and 110 s before) is refused in bounded memory and time."""
    n = 2_000_000
    pickled = {
        "empty lists": b"\x80\x02" + b"]" * n + b".",
        "empty tuples": b"\x80\x02(" + b")" * n + b"t.",
        "nested marks": b"\x80\x02" + b"(" * (n // 2) + b")" * (n // 2) + b".",
        "memo at 2^31": b"\x80\x02]" + b"r\xff\xff\xff\x7f" * 1000 + b".",  # LONG_BINPUT: a memo array of 2^31
        "memo gets": b"\x80\x02]q\x00(" + b"h\x00" * n + b"e.",
        "one huge string": b"\x80\x02X" + struct.pack("<I", 15 * 2**20) + b"a" * (15 * 2**20) + b".",
        "deep tuple key": b"\x80\x02}" + b")" + b"\x85" * 100_000 + int4(1) + b"s.",  # hashing recursed in C
        # Integer keys that are all multiples of 2**61 - 1 hash alike: each insert compared with every other.
        "colliding keys": b"\x80\x02}(" + b"".join(int4(i * (2**61 - 1)) + b"N" for i in range(1, 200_000)) + b"u.",
    }[flood]
    path = torch_zip(tmp_path / "flood.bin", pickled)
    done, seconds, extra = refused_in_child("mlx_vit.convert.torch_pickle.read_torch_bin", path, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(path) in done.stdout and "SECONDS" in done.stdout, done.stdout
    assert seconds < 10, done.stdout
    assert extra < 400, (extra, baseline_mb())


def test_huge_integers_in_a_tensor_size_are_refused_before_any_arithmetic(tmp_path):
    """The largest integer LONG1 writes (255 bytes; LONG4, whose 4 MB integers multiplied ran for minutes, is
    refused as torch.load's weights-only reader refuses it), fetched 32 times as a tensor's size."""
    big = b"\x8a\xff" + b"\x7f" * 255 + b"q\x00" + b"h\x00" * 31
    rebuild = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage("0", 1) + int4(0) + b"(" + big + b"t("
               + int4(1) * 32 + b"t\x89ccollections\nOrderedDict\n)RtR")  # fmt: skip
    path = torch_zip(tmp_path / "big-ints.bin", state_dict(("w", rebuild)), {"0": bytes(4)})
    start = time.monotonic()
    assert "past 2**62" in one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    assert time.monotonic() - start < 5


def test_a_member_stored_twice_is_refused(tmp_path):
    """torch reads the first of two same-named zip members and zipfile the last: other weights, no error."""
    pickled = state_dict(("w", tensor(storage("0", 1), 0, (1,), (1,))))
    path = torch_zip(tmp_path / "twice.bin", pickled, {"0": np.float32(1).tobytes()})
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as archive:
        warnings.simplefilter("ignore")  # "Duplicate name"
        archive.writestr("archive/data/0", np.float32(100).tobytes())
    assert "holds 'archive/data/0' twice" in one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)


def test_a_tensor_larger_than_memory_is_one_line(tmp_path):
    """A sparse safetensors file declaring 40 GB: its size is not memory."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**30, 10], "data_offsets": [0, 40 * 2**30]}}).encode()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 40 * 2**30)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))"
    done, _, _ = refused_in_child("mlx_vit.convert.safetensors_io.read_safetensors", path, setup=limit)
    assert "does not fit in memory" in done.stdout and "Traceback" not in done.stderr, done.stdout + done.stderr


def test_zip_bomb_storage_is_refused_before_it_inflates(tmp_path):
    """A deflated storage of zeros declaring 512 MB (a 500 kB file): never more than twice the file's size."""
    numel = 2**27
    path = torch_zip(tmp_path / "bomb.bin", state_dict(("w", tensor(storage("0", numel), 0, (numel,), (1,)))),
                     {"0": bytes(4 * numel)}, compress=zipfile.ZIP_DEFLATED)  # fmt: skip
    assert path.stat().st_size < 1_000_000
    done, _, extra = refused_in_child("mlx_vit.convert.torch_pickle.read_torch_bin", path)
    assert "more than 2x the file's size" in done.stdout, done.stdout + done.stderr[-2000:]
    assert extra < 100, (extra, baseline_mb())


def test_a_large_storage_is_read_in_place(tmp_path):
    """A 256 MB tensor costs its own 256 MB: read straight into its array, not through a full-size copy."""
    numel = 2**26
    path = torch_zip(tmp_path / "big.bin", state_dict(("w", tensor(storage("0", numel), 0, (numel,), (1,)))),
                     {"0": np.arange(numel, dtype=np.float32).tobytes()})  # fmt: skip
    code = f"""
from mlx_vit.convert.torch_pickle import read_torch_bin
print(float(read_torch_bin({str(path)!r})["w"][12345]))
"""
    done, peak = peak_mb(code)
    assert done.stdout.split() == ["12345.0"], done.stdout + done.stderr[-2000:]
    assert peak - baseline_mb() < 256 + 64, (peak, baseline_mb())


def test_one_storage_fanned_out_into_many_tensors_is_refused(tmp_path):
    """Each tensor a view of the whole storage: 100 copies of it would be 100x the file."""
    numel = 2**18
    ref = storage("0", numel)
    items = [(f"w{i}", tensor(ref if i == 0 else b"h\x00", 0, (numel,), (1,))) for i in range(100)]
    pickled = b"\x80\x02}(" + b"".join(text(k) + v for k, v in items) + b"u."
    pickled = pickled.replace(ref, ref + b"q\x00", 1)  # memoize the storage once, fetch it for the others
    path = torch_zip(tmp_path / "fan.bin", pickled, {"0": bytes(4 * numel)})
    assert "more than 2x the file's size" in one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)
    # Two tensors on one storage (tied weights) are fine, and a storage is read once however many views it has.
    pickled = b"\x80\x02}(" + b"".join(text(k) + v for k, v in items[:2]) + b"u."
    pickled = pickled.replace(ref, ref + b"q\x00", 1)
    tied = tp.read_torch_bin(torch_zip(tmp_path / "tied.bin", pickled, {"0": bytes(4 * numel)}))
    assert set(tied) == {"w0", "w1"} and not np.shares_memory(tied["w0"], tied["w1"])


def test_tensor_views_stay_inside_their_storage_whatever_the_pickle(tmp_path):
    """Offsets, sizes and strides are checked against the storage's own element count, in Python integers."""
    four = np.arange(4, dtype="<f4").tobytes()
    for offset, size, stride in [(0, (2**31, 2**31), (0, 0)), (3, (2,), (2**62,)), (2**40, (1,), (1,)),
                                 (0, (2, 3), (2**62, 1)), (1, (4,), (1,))]:  # fmt: skip
        path = torch_zip(tmp_path / "v.bin", state_dict(("w", tensor(storage("0", 4), offset, size, stride))),
                         {"0": four})  # fmt: skip
        one_line_error(CheckpointError, tp.read_torch_bin, path, names=path)


# ==========================================================================================================
# 2. Crashes by signal: sizes MLX's kernels cannot take are refused before anything runs


def edit_json(path: Path, **changes) -> Path:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))
    return path


@pytest.mark.parametrize(
    "changes, needle",
    [
        # ~16,000 tokens and many heads: MLX's CPU matmul indexed its batch with 32-bit offsets (SIGSEGV)
        (dict(image_size=2032, patch_size=16, hidden_size=128, num_attention_heads=64), "attention scores"),
        (dict(image_size=2032, patch_size=16, hidden_size=4096, num_attention_heads=32), "activations"),
        (dict(image_size=8192, patch_size=8192, hidden_size=32), "activations"),  # a 200 MB input per image
    ],
)
def test_configs_mlx_cannot_run_are_refused_before_anything_runs(hf_copy, isolated, changes, needle):
    edit_json(hf_copy / "config.json", **changes)
    cli_fails("classify", PHOTO, "-m", hf_copy, env=isolated, needle=needle)


def test_heads_of_millions_of_classes_are_refused():
    """2**24 classes cost 5.3 GB for one photo, and their labels overflow the JSON reader's limits."""
    assert "num_labels must be an integer from 0 to 131,072" in one_line_error(
        ConfigError, ViTConfig.from_dict, {"num_labels": 2**24}, "config.json"
    )
    ViTConfig.from_dict({"num_labels": 21_843}, "config.json")  # ImageNet-21k


def test_attention_in_query_blocks_equals_attention_at_once(monkeypatch):
    """Past ATTENTION_BLOCK scores, queries go in blocks, each evaluated: the same numbers, bounded memory."""
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_attention_heads=4,
                                    intermediate_size=64, num_hidden_layers=2, num_labels=5)  # fmt: skip
    mx.random.seed(0)
    model = model_module.ViT(config)
    x = mx.random.normal((3, 64, 64, 3))
    at_once = np.array(model(x))
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK", 3 * 4 * 65 * 7)  # blocks of 7 queries (65 tokens)
    blocked = np.array(model(x))
    np.testing.assert_allclose(blocked, at_once, rtol=0, atol=1e-6)


def test_a_batch_over_the_activation_limit_is_split(vit_folder, monkeypatch):
    classifier = load(str(vit_folder))
    photos = [IMAGES / n for n in ("chelsea.png", "camera.png", "rocket.jpg")]
    whole = classifier.logits(classifier.pixels(photos))
    monkeypatch.setattr(config_module, "MAX_ACTIVATION", classifier.model.config.activation_elements())
    assert classifier.model.config.max_batch() == 1
    calls = []
    forward = classifier.model.__call__
    monkeypatch.setattr(type(classifier.model), "__call__", lambda self, x: calls.append(x.shape[0]) or forward(x))
    np.testing.assert_allclose(classifier.logits(classifier.pixels(photos)), whole, atol=1e-5)
    assert calls == [1, 1, 1]


# ==========================================================================================================
# 3. Hangs: only regular files are opened, every JSON file through one capped reader


def mlx_model(vit_folder: Path, tmp_path: Path, name: str = "mlx") -> Path:
    return convert(str(vit_folder), tmp_path / name)


def run_with_timeout(call, seconds: float = 10):
    """call() in a thread; fails the test (instead of hanging it) if it does not return in time."""
    outcome: list = []

    def target():
        try:
            outcome.append(("value", call()))
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome.append(("error", error))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s (a hang)"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


@pytest.mark.parametrize("where", ["hf config.json", "hf preprocessor", "mlx config.json", "mlx manifest",
                                   "mlx weights", "bin weights"])  # fmt: skip
def test_a_fifo_in_a_model_folder_is_refused_at_once(vit_folder, tmp_path, where):
    kind, name = where.split(" ", 1)
    folder = mlx_model(vit_folder, tmp_path) if kind == "mlx" else shutil.copytree(vit_folder, tmp_path / "hf")
    file = {"config.json": "config.json", "preprocessor": "preprocessor_config.json", "manifest": "manifest.json",
            "weights": "model.safetensors"}.get(name, "pytorch_model.bin")  # fmt: skip
    if kind == "bin":
        (folder / "model.safetensors").unlink()
    if where == "mlx weights":
        (folder / "manifest.json").unlink()  # (with it, the size check refuses the FIFO first)
    (folder / file).unlink(missing_ok=True)
    os.mkfifo(folder / file)
    message = run_with_timeout(lambda: one_line_error(MlxVitError, load_model, str(folder)))
    assert "FIFO" in message or "no config.json" in message, message


def test_devices_and_sparse_files_as_config_json(vit_folder, tmp_path, isolated):
    """`-m FOLDER` once read config.json whole: /dev/zero grew to 12 GB, a sparse 2.5 GB file cost 5 GB."""
    zero = shutil.copytree(vit_folder, tmp_path / "zero")
    (zero / "config.json").unlink()
    (zero / "config.json").symlink_to("/dev/zero")
    sparse = mlx_model(vit_folder, tmp_path, "sparse")
    with open(sparse / "config.json", "r+b") as f:
        f.truncate(2_500_000_000)
    for folder, needle in ((zero, "character device"), (sparse, "too large for a config file")):
        done, _, extra = refused_in_child("mlx_vit.loading.load_model", folder, timeout=60)
        assert needle in done.stdout, done.stdout + done.stderr[-2000:]
        assert extra < 100, (extra, baseline_mb())


# ==========================================================================================================
# 5. Tracebacks: a converted folder is as untrusted as a checkpoint, and convert writes only what loads


def edit_mlx(folder: Path, drop_manifest: bool = True, **changes) -> Path:
    edit_json(folder / "config.json", **changes)
    if drop_manifest:
        (folder / "manifest.json").unlink(missing_ok=True)
    return folder


def test_deeply_nested_json_in_a_converted_folder(vit_folder, tmp_path, isolated):
    folder = mlx_model(vit_folder, tmp_path)
    nested = "[" * 100_000 + "]" * 100_000
    (folder / "manifest.json").write_text(nested)
    one_line_error(CheckpointError, load_model, str(folder), names=folder / "manifest.json")
    (folder / "config.json").write_text('{"format": "mlx-vit", "id2label": ' + nested + "}")
    cli_fails("classify", PHOTO, "-m", folder, env=isolated, needle="not valid JSON")


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(runtime_dtype="int8"), "unknown key 'runtime_dtype'"),
        (dict(dtype="int8"), "dtype must be one of float32, float16, bfloat16, got 'int8'"),
        (dict(dtype="x" * 5_000_000), "dtype must be one of"),
        (dict(id2label={str(i): f"c{i}" for i in range(9)}), "lacks class 9"),
        (dict(id2label={**{str(i): f"c{i}" for i in range(9)}, "99": "x"}), "has '99'"),
        (dict(id2label={str(i): i for i in range(10)}), "id2label must map class ids to label names"),
        (dict(problem_type="regression\x1b[2J"), "problem_type"),
        (dict(format_version=2), "format version 1"),
        (dict(quantization={"bits": 4, "group_size": 64, "layers": "blocks.0"}), "malformed quantization"),
    ],
)
def test_converted_folder_configs_are_checked_in_every_key(vit_folder, tmp_path, isolated, changes, needle):
    folder = edit_mlx(mlx_model(vit_folder, tmp_path), **changes)
    message = one_line_error(ConfigError, load_model, str(folder), names=folder / "config.json")
    assert needle in message and len(message) < 500, message[:1000]
    cli_fails("classify", PHOTO, "-m", folder, env=isolated, needle=needle)


@pytest.mark.parametrize(
    "preprocessing, needle",
    [
        (dict(size={"height": 64, "width": 64}), "makes 64x64 pixels but the model takes 32x32"),
        (dict(do_resize=False), "makes variable-size pixels"),
        (dict(size={"shortest_edge": 32}), "makes variable-size pixels"),
    ],
)
def test_converted_preprocessing_must_make_the_model_input(vit_folder, tmp_path, isolated, preprocessing, needle):
    folder = mlx_model(vit_folder, tmp_path)
    good = json.loads((folder / "config.json").read_text())["preprocessing"]
    edit_mlx(folder, preprocessing={**good, **preprocessing})
    cli_fails("classify", PHOTO, "-m", folder, env=isolated, needle=needle)


def save_weights(folder: Path, change) -> Path:
    """Rewrite a folder's model.safetensors (and drop its manifest) with `change(tensors)` applied."""
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    change(tensors)
    (folder / "model.safetensors").unlink()
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    (folder / "manifest.json").unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda t: t.update({"head.weight": t["head.weight"][:0]}), "'head.weight' has shape (0, 32)"),
        (lambda t: t.update({"norm.weight": t["norm.weight"].astype(np.int32)}), "'norm.weight' is int32"),
        (lambda t: t.pop("norm.bias"), "lack 'norm.bias'"),
        (lambda t: t.update({"extra\x1b[2J" + "x" * 5000: np.zeros(1, np.float32)}), "is not a parameter"),
        (lambda t: t["head.bias"].__setitem__(3, np.nan), "'head.bias' holds NaN or infinite values"),
    ],
)
def test_converted_weights_are_checked(vit_folder, tmp_path, isolated, change, needle):
    folder = save_weights(mlx_model(vit_folder, tmp_path), change)
    message = cli_fails("classify", PHOTO, "-m", folder, env=isolated, needle=needle)
    assert len(message) < 500, message


def test_quantized_weights_are_checked_as_stored_before_the_cpu_expands_them(vit_folder, tmp_path, isolated):
    """Biases cut to half their groups broadcast when expanded to float32: wrong scores, and no error."""
    folder = convert(str(vit_folder), tmp_path / "q", quantize=Quantize(bits=4, group_size=32))
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    biases = next(key for key in tensors if key.endswith(".biases") and tensors[key].shape[1] > 1)
    save_weights(folder, lambda t: t.update({biases: t[biases][:, :1]}))
    cli_fails("classify", PHOTO, "-m", folder, env=isolated, needle=f"'{biases}' has shape")


def test_a_quantization_that_does_not_fit_the_model_is_one_line(vit_folder, tmp_path):
    """Found by the converted-folder fuzz target: a width its group size does not divide raised in nn.quantize."""
    folder = convert(str(vit_folder), tmp_path / "q", quantize=Quantize(bits=4, group_size=32))
    config = json.loads((folder / "config.json").read_text())
    edit_mlx(folder, model={**config["model"], "hidden_size": 16, "num_attention_heads": 4})
    message = one_line_error(ConfigError, load_model, str(folder), names=folder / "config.json")
    assert "the quantization does not fit the model" in message, message


def test_a_sparse_weights_file_is_checked_before_it_is_loaded(vit_folder, tmp_path):
    """A header declaring 8 GB under a name the model lacks (a sparse file): refused before MLX reads a byte."""
    folder = mlx_model(vit_folder, tmp_path)
    header = json.dumps({"junk": {"dtype": "F32", "shape": [2**30, 2], "data_offsets": [0, 2**33]}}).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2**33)
    (folder / "manifest.json").unlink()
    done, _, extra = refused_in_child("mlx_vit.loading.load_model", folder)
    assert "the weights lack" in done.stdout, done.stdout + done.stderr[-2000:]
    assert extra < 100, (extra, baseline_mb())


def test_a_checkpoint_declaring_more_than_its_model_needs_is_refused_before_it_is_read(hf_copy):
    """A tensor the model lacks, 3 GB in a sparse file: its size is in the header, so it is refused from there,
    before gigabytes are read (it took 3.2 GB and 19 s to learn that its name was unexpected)."""
    tensors = safetensors.numpy.load_file(hf_copy / "model.safetensors")
    header, position = {}, 0
    for key, value in tensors.items():
        header[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [position, position + value.nbytes]}
        position += value.nbytes
    header["junk"] = {"dtype": "U8", "shape": [3, 2**30], "data_offsets": [position, position + 3 * 2**30]}
    raw = json.dumps(header).encode()
    with open(hf_copy / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(v.astype("<f4").tobytes() for v in tensors.values()))
        f.truncate(8 + len(raw) + position + 3 * 2**30)
    done, seconds, extra = refused_in_child("mlx_vit.convert.checkpoint.read_checkpoint", hf_copy)
    assert "more than its model could use" in done.stdout, done.stdout + done.stderr[-2000:]
    assert extra < 100 and seconds < 10, (extra, seconds)


def hf_weights(folder: Path, change) -> Path:
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    change(tensors)
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    "change, needle",
    [
        # a patch embedding with zero rows crashed the kernel transpose
        (lambda t: t.update({"vit.embeddings.patch_embeddings.projection.weight": np.zeros((0, 3, 8, 8), np.float32)}),
         "patch projection has shape (0, 3, 8, 8)"),
        (lambda t: t.update({"classifier.weight": t["classifier.weight"].astype(np.int64)}), "is int64"),
        (lambda t: t.update({"vit.layernorm.weight": np.ones(31, np.float32)}), "'norm.weight' has shape (31,)"),
        (lambda t: t.update({"vit.encoder.layer.0.attention.attention.query.weight": np.ones((32, 31), np.float32)}),
         "query/key/value weight shapes"),
    ],
)  # fmt: skip
def test_convert_writes_only_what_loads(hf_copy, tmp_path, isolated, change, needle):
    hf_weights(hf_copy, change)
    cli_fails("convert", hf_copy, "-o", tmp_path / "out", env=isolated, needle=needle)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_full_disk_during_convert_is_one_line(vit_folder, tmp_path):
    """MLX reports a failed write as RuntimeError('[write] Unable to write'); a file-size limit makes it real."""
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.argv = ["mlx-vit", "convert", {str(vit_folder)!r}, "-o", {str(tmp_path / "out")!r}]
from mlx_vit.cli import main
main()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"error: {tmp_path / 'out'}: cannot write the model" in done.stderr, done.stderr
    assert "is the disk full?" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == []


def test_names_over_255_bytes(vit_folder, tmp_path, isolated):
    long = "x" * 300
    cli_fails("convert", vit_folder, "-o", tmp_path / long, env=isolated, needle="file name too long")
    cli_fails("classify", PHOTO, "-m", tmp_path / long, env=isolated, needle="file name too long")
    cli_fails("classify", tmp_path / long, "-m", vit_folder, env=isolated, needle="file name too long")


# ==========================================================================================================
# 6. Silent wrong answers


def test_two_names_for_one_parameter_are_refused(hf_copy, tmp_path, isolated):
    """`vit.layernorm.weight` and `layernorm.weight` both: transformers takes one, we must not guess."""
    hf_weights(hf_copy, lambda t: t.update({"layernorm.weight": t["vit.layernorm.weight"] * 0 + 3}))
    message = cli_fails("convert", hf_copy, "-o", tmp_path / "out", env=isolated, needle="are both norm.weight")
    assert "vit.layernorm.weight" in message and "'layernorm.weight'" in message


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda t: t["classifier.bias"].__setitem__(3, np.nan), "tensor 'classifier.bias' holds NaN"),
        (lambda t: t["vit.embeddings.cls_token"].__setitem__((0, 0, 1), -np.inf), "'vit.embeddings.cls_token'"),
        (lambda t: t.update({"classifier.bias": np.full(t["classifier.bias"].shape, 1e300)}),
         "'classifier.bias' holds values beyond float32's range"),
    ],
)  # fmt: skip
def test_non_finite_weights_are_refused_by_name(hf_copy, tmp_path, isolated, change, needle):
    hf_weights(hf_copy, change)
    cli_fails("convert", hf_copy, "-o", tmp_path / "out", env=isolated, needle=needle)
    cli_fails("classify", PHOTO, "-m", hf_copy, "--format", "json", env=isolated, needle=needle)


def test_weights_that_overflow_half_precision_are_refused(hf_copy, tmp_path, isolated):
    hf_weights(hf_copy, lambda t: t["classifier.bias"].__setitem__(0, 1e6))  # fine in float32, inf in float16
    cli_fails("convert", hf_copy, "-o", tmp_path / "half", "--dtype", "float16", env=isolated,
              needle="'head.bias' holds NaN or infinite values (in float16)")  # fmt: skip
    assert run_cli("convert", hf_copy, "-o", tmp_path / "f32", env=isolated).returncode == 0


def test_scores_that_are_not_numbers_are_an_error_never_nan(vit_folder, tmp_path, isolated):
    """Finite weights can still overflow inside the model; the image gets an error, JSON never gets NaN."""

    def overflow(tensors):  # each finite; their sum, the first token, is not
        tensors["cls_token"][:] = 3e38
        tensors["pos_embed"][:] = 3e38

    folder = save_weights(mlx_model(vit_folder, tmp_path), overflow)
    done = run_cli("classify", PHOTO, IMAGES / "rocket.jpg", "-m", folder, "--format", "json", env=isolated)
    assert done.returncode == 1, done.stderr
    results = json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))
    assert all("computed NaN or infinite scores" in r["error"] for r in results), results


# ==========================================================================================================
# 7. Terminal injection and 8. unbounded messages


def test_labels_and_file_names_never_reach_the_terminal_raw(tmp_path, isolated):
    folder = make_checkpoint(tmp_path / "model", num_labels=3)
    edit_json(folder / "config.json", id2label={"0": f"cat{CONTROL}", "1": "dog\r\nerror: fake", "2": "ok\u202e :cat:"})
    photo = tmp_path / f"photo{CONTROL}.png"
    shutil.copy(PHOTO, photo)
    for fmt in ("table", "jsonl"):
        done = run_cli("classify", photo, tmp_path / f"missing{CONTROL}.png", "-m", folder, "--format", fmt,
                       "-k", "3", env=isolated)  # fmt: skip
        assert done.returncode == 1, done.stderr
        for stream in (done.stdout, done.stderr):
            assert not any(ord(c) < 32 and c != "\n" or 0x7F <= ord(c) <= 0x9F for c in stream), repr(stream)
            assert "\u202e" not in stream
        assert "\\x1b]0;pwned\\x07" in done.stderr  # the file name, escaped, in the error line
        assert ":cat:" in done.stdout and "\U0001f431" not in done.stdout  # nor does rich make emoji of it
        assert sum(line.startswith("error: ") for line in done.stderr.splitlines()) == 1
    lines = [json.loads(line) for line in done.stdout.splitlines()]  # jsonl keeps the exact strings
    assert lines[0]["path"] == str(photo)
    assert {p["label"] for p in lines[0]["predictions"]} == {f"cat{CONTROL}", "dog\r\nerror: fake", "ok\u202e :cat:"}


def test_shard_names_and_long_values_in_errors(hf_copy, isolated):
    index = {"weight_map": {"vit.layernorm.weight": f"model-00001{CONTROL}.safetensors"}}
    (hf_copy / "model.safetensors").rename(hf_copy / "renamed.safetensors")
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    message = cli_fails("classify", PHOTO, "-m", hf_copy, env=isolated, needle="is missing")
    assert "\\x1b]0;pwned" in message


def test_a_5mb_dtype_string_gives_a_short_message(tmp_path):
    header = json.dumps({"w": {"dtype": "F" * 5_000_000, "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    from mlx_vit.convert.safetensors_io import read_safetensors

    assert len(one_line_error(CheckpointError, read_safetensors, path, names=path)) < 300


def test_shown_escapes_every_control_character_and_bounds_length():
    text = "".join(map(chr, range(0x100))) + "\u2028\u2029\u202e\u2066\udcff" + "y" * 1000
    escaped = shown(text, 10**6)
    assert all(0x20 <= ord(c) < 0x7F or 0xA0 <= ord(c) <= 0xFF for c in escaped), escaped
    assert "\\x1b" in escaped and "\\n" in escaped and "\\u202e" in escaped and "\\xff" in escaped
    assert len(shown(text)) <= NAME_LIMIT and len(shown(10**10000)) < 40
    assert len(shown(["x" * 10**6] * 10**3)) <= NAME_LIMIT and len(shown("x" * 10**6, 50)) == 50
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert shown(nested) == "[[[[...]]]]"
