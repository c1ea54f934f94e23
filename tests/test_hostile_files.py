"""Hostile files met by mlx-vit's own readers and writers: resume files, embed's spool, index files, stdin, globs,
configs, environment variables and full disks, through the real CLI.

What a user relies on, whatever the damage:
- a bad file is exactly one line on stderr, `error: ...` (bounded, naming the file), exit code 1, no traceback;
- `--resume` never loses or reorders a finished result: it may drop only the one incomplete last record of a
  jsonl or csv file, or refuse the file with one line and leave it as it was;
- nothing outside the requested outputs is written or created (not through a symlink planted beside them);
- nothing hangs (FIFOs, quadratic readers) and nothing reads without a bound (sparse files of gigabytes).

Each run is watched: it is killed after a timeout, or once its resident memory passes MEMORY_MB.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from checkpoints import IMAGES, PHOTOS

from mlx_vit.errors import MlxVitError

PHOTO = IMAGES / "chelsea.png"
MAX_LINE = 300  # characters in any error line
MEMORY_MB = 500  # a run's resident memory (an ordinary run here peaks at ~100 MB)
HANG = 30  # seconds: far beyond what any of these runs needs
SPARSE = 5 * 2**30  # a sparse file's size: 5 GB of zeros that take no disk
WIDTH = 32  # the test model's feature width (tests/checkpoints.py SMALL)


# ---------------------------------------------------------------------------------------------------------------
# Running the CLI, watched


@dataclass
class Ran:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float
    killed: str | None  # "timeout" or "memory"

    def __str__(self) -> str:
        tail = self.stderr[-1500:]
        return f"rc={self.returncode} killed={self.killed} {self.seconds:.1f} s {self.peak_mb:.0f} MB stderr: {tail}"

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def _peak_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


def _limit_address_space():
    # A safety net only (the watchdog kills at MEMORY_MB): a runaway read never takes the shared machine down.
    # (Not lower: OpenBLAS at its maximum thread count reserves gigabytes, and under 8 GiB it hangs.)
    resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))


def mlx(*args, env: dict, cwd=None, stdin: bytes | str | Path | None = None, stdout: str | Path | None = None,
        timeout: float = HANG, memory_mb: float = MEMORY_MB) -> Ran:  # fmt: skip
    """`mlx-vit ARGS` in a subprocess: stdin from bytes or a file, stdout to a file (e.g. /dev/full) or captured.
    Killed (with its process group) after `timeout` seconds or once its peak resident memory passes `memory_mb`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as given:
        if isinstance(stdin, bytes):
            given.write(stdin)
            given.seek(0)
            source = given
        elif stdin is not None:
            source = open(stdin, "rb")  # noqa: SIM115
        else:
            source = subprocess.DEVNULL
        sink = open(stdout, "w") if stdout is not None else out  # noqa: SIM115
        started = time.monotonic()
        try:
            child = subprocess.Popen([sys.executable, "-m", "mlx_vit", *map(str, args)], stdin=source, stdout=sink,
                                     stderr=err, cwd=cwd, env={**os.environ, **env}, start_new_session=True,
                                     preexec_fn=_limit_address_space)  # fmt: skip
        finally:
            if source is not subprocess.DEVNULL and source is not given:
                source.close()
            if sink is not out:
                sink.close()
        peak, killed = 0.0, None
        while child.poll() is None:
            peak = max(peak, _peak_mb(child.pid))
            if peak > memory_mb:
                killed = "memory"
            elif time.monotonic() - started > timeout:
                killed = "timeout"
            if killed:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                break
            time.sleep(0.02)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        decode = lambda f: f.read().decode("utf-8", "replace")  # noqa: E731
        return Ran(child.returncode, decode(out), decode(err), seconds, peak, killed)


def clean(ran: Ran, codes=(0, 1)) -> None:
    """Ended on its own, within time and memory, with an allowed exit code, no traceback, short lines."""
    assert ran.killed is None, str(ran)
    assert "Traceback" not in ran.stderr and "Exception ignored" not in ran.stderr, str(ran)
    assert ran.returncode in codes, str(ran)
    long = [line for line in ran.stderr.splitlines() if len(line) > MAX_LINE]
    assert not long, f"{len(long[0])}-character line: {long[0][:200]}..."


def one_error(ran: Ran, *names: str | tuple[str, ...], code: int = 1) -> str:
    """`clean`, exit `code`, and exactly one `error:` line, naming each of `names` (a tuple: one of them)."""
    clean(ran, (code,))
    assert len(ran.errors) == 1, str(ran)
    for name in names:
        assert any(n in ran.errors[0] for n in ((name,) if isinstance(name, str) else name)), ran.errors[0]
    return ran.errors[0]


def works_or_one_error(ran: Ran, *names: str | tuple[str, ...]) -> None:
    """Either it works (exit 0), or it is refused with exactly one error line."""
    clean(ran)
    if ran.returncode != 0:
        one_error(ran, *names)


def kept_or_refused(ran: Ran, path: Path, before: bytes, keep: bytes) -> None:
    """A resume either refuses `path` (one line naming it, the file untouched) or keeps `keep`, the finished
    results, at its start, byte for byte and in order."""
    clean(ran)
    after = path.read_bytes() if path.stat().st_size < 2**24 else None
    if ran.returncode == 1 and len(ran.errors) == 1 and path.name in ran.errors[0]:
        if after is None:  # a sparse file refused: still the same file
            assert path.stat().st_size == SPARSE
        else:
            assert after == before, "refused, but the file was changed"
        return
    assert ran.returncode == 0 and not ran.errors, str(ran)
    assert after is not None, "the resumed file was not cut back, nor refused"
    assert after.startswith(keep), f"finished results lost or reordered:\n{keep[:300]!r}\n{after[:300]!r}"


def sparse(path: Path, head: bytes = b"", size: int = SPARSE) -> Path:
    """`head`, then zeros up to `size` bytes, without writing them (a sparse file)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.fixture
def fifos(tmp_path):
    """Makes FIFOs; removes them (and any left where they were) after the test."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        made.append(fifo(path))
        return path

    yield make
    for path in made:
        if path.is_fifo():
            path.unlink()


# ---------------------------------------------------------------------------------------------------------------
# One converted model for the whole file, and inputs


@pytest.fixture(scope="module")
def model(vit_folder, tmp_path_factory) -> Path:
    """The session's tiny ViT, converted once to an MLX folder (loads in a fraction of a second)."""
    from mlx_vit.convert import convert

    return Path(convert(str(vit_folder), tmp_path_factory.mktemp("hostile-files") / "mlx")).resolve()


@pytest.fixture
def env(tmp_path) -> dict:
    return {"HF_HOME": str(tmp_path / "hf"), "MLX_VIT_CACHE": str(tmp_path / "mlx-vit"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    """Eight photos, photos/p1.png ... p8.png (absolute paths)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    out = []
    for i in range(1, 9):
        shutil.copy(PHOTO, folder / f"p{i}.png")
        out.append(folder / f"p{i}.png")
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. --resume of a csv output never loses a finished result


def csv_records(paths: list[Path]) -> list[bytes]:
    """mlx-vit's csv rows for each path (two ranks, labels no run would write: a result redone shows), as bytes."""
    records = []
    for i, path in enumerate(paths, 1):
        text = io.StringIO()
        csv.writer(text).writerows([[path, 1, f"kept {i}", "0.75", 1, ""], [path, 2, f"kept {i} b", "0.25", 2, ""]])
        records.append(text.getvalue().encode())
    return records


HEADER = b"path,rank,label,score,class_id,error\r\n"


@pytest.mark.parametrize("quote", ['ke"pt 3', '"kept 3', 'kept 3"'], ids=["mid-field", "field-start", "field-end"])
def test_a_stray_quote_in_a_csv_never_costs_finished_results(model, env, photos, tmp_path, quote):
    out = tmp_path / "out.csv"
    records = csv_records(photos)
    records[2] = records[2].replace(b"kept 3", quote.encode(), 1)
    before = HEADER + b"".join(records)
    out.write_bytes(before)
    ran = mlx("classify", *photos, "-m", model, "-o", out, "--resume", "-k", "2", env=env)
    # Every image is finished; only the last one's rows may be redone (csv keeps it aside), none other.
    kept_or_refused(ran, out, before, HEADER + b"".join(records[:7]))


def test_an_unclosed_quote_in_a_large_csv_is_read_in_linear_time(model, env, photos, tmp_path):
    out = tmp_path / "out.csv"
    records = csv_records(photos[:3])
    tail = b'"' + b"x\n" * 400_000  # 800 kB after an unclosed quote (the quote-counting reader took 87 s)
    before = HEADER + b"".join(records) + tail
    out.write_bytes(before)
    ran = mlx("classify", photos[3], "-m", model, "-o", out, "--resume", "-k", "2", env=env, timeout=20)
    kept_or_refused(ran, out, before, HEADER + b"".join(records[:2]))


# ---------------------------------------------------------------------------------------------------------------
# 2. embed's spool beside `-o FILE` never writes or creates a file elsewhere, and a FIFO there never hangs

SPOOL = {"rows": ".out.npy.rows", "paths": ".out.npy.paths.jsonl", "meta": ".out.npy.spool.json"}


@pytest.mark.parametrize("planted", ["symlink", "dangling symlink", "fifo"])
@pytest.mark.parametrize("spool", list(SPOOL))
def test_a_fresh_embed_never_writes_through_whatever_is_planted_at_its_spool(model, env, tmp_path, fifos, spool,
                                                                             planted):  # fmt: skip
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "victim.txt"
    victim.write_bytes(b"precious data, not a spool\n" * 10)
    at = work / SPOOL[spool]
    if planted == "symlink":
        at.symlink_to(victim)
    elif planted == "dangling symlink":
        at.symlink_to(elsewhere / "created.txt")
    else:
        fifos(at)
    ran = mlx("embed", PHOTO, "-m", model, "-o", work / "out.npy", env=env)
    works_or_one_error(ran, "out.npy")
    assert victim.read_bytes() == b"precious data, not a spool\n" * 10
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim.txt"]  # nothing created there
    if ran.returncode == 0:
        assert np.load(work / "out.npy").shape == (1, WIDTH)


def make_spool(work: Path, model: Path, paths: bytes | None = None, rows: int = 1) -> Path:
    """The spool of an `embed -o work/out.npy` run killed after its first batch (PHOTO), as it leaves it."""
    work.mkdir(exist_ok=True)
    meta = {"model": str(model), "shape": [WIDTH], "normalize": "false", "all_tokens": "false", "image_size": "32"}
    (work / SPOOL["meta"]).write_text(json.dumps(meta) + "\n")
    (work / SPOOL["rows"]).write_bytes(np.ones((rows, WIDTH), np.float32).tobytes())
    if paths is not None:
        (work / SPOOL["paths"]).write_bytes(paths)
    return work / "out.npy"


def test_a_spool_resumes(model, env, tmp_path):
    """The hand-made spool the tests below damage is one `embed --resume` goes on from."""
    out = make_spool(tmp_path / "work", model, json.dumps({"path": str(PHOTO)}).encode() + b"\n")
    ran = mlx("embed", PHOTO, PHOTOS[1], "-m", model, "-o", out, "--resume", env=env)
    clean(ran, (0,))
    assert "1 skipped" in ran.stderr, ran.stderr
    assert (out.parent / "out.paths.txt").read_text().splitlines() == [str(PHOTO), str(PHOTOS[1])]
    assert np.load(out)[0].tolist() == [1.0] * WIDTH  # the spooled row, kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.npy", "out.paths.txt"]


SPOOL_LINES = {
    "nested 100k deep": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "lone surrogate": b'{"path": "\\ud800"}\n',
    "number": b'{"path": 5}\n',
    "null": b'{"path": null}\n',
    "list": b'{"path": ["a"]}\n',
}


@pytest.mark.parametrize("damage", list(SPOOL_LINES))
def test_a_damaged_spool_paths_line_is_one_error(model, env, tmp_path, damage):
    out = make_spool(tmp_path / "work", model, SPOOL_LINES[damage])
    ran = mlx("embed", PHOTOS[1], "-m", model, "-o", out, "--resume", env=env)
    works_or_one_error(ran, "out.npy")


def test_a_sparse_spool_paths_file_is_not_read_whole(model, env, tmp_path):
    out = make_spool(tmp_path / "work", model)
    sparse(out.parent / SPOOL["paths"], json.dumps({"path": str(PHOTO)}).encode() + b"\n")
    ran = mlx("embed", PHOTOS[1], "-m", model, "-o", out, "--resume", env=env)
    works_or_one_error(ran, "out.npy")


def test_a_fifo_spool_paths_file_does_not_hang_a_resume(model, env, tmp_path, fifos):
    out = make_spool(tmp_path / "work", model)
    fifos(out.parent / SPOOL["paths"])
    ran = mlx("embed", PHOTOS[1], "-m", model, "-o", out, "--resume", env=env)
    works_or_one_error(ran, "out.npy")


@pytest.mark.parametrize("spool", ["rows", "paths"])
def test_a_resume_never_writes_through_a_symlinked_spool_file(model, env, tmp_path, spool):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    line = json.dumps({"path": str(PHOTO)}).encode() + b"\n"
    out = make_spool(work, model, line)
    victim = elsewhere / "victim"
    # What the link points to looks like the spool file it stands for, so a reader that follows it goes on.
    content = np.ones((1, WIDTH), np.float32).tobytes() + b"not a row" if spool == "rows" else line + b"not a line"
    victim.write_bytes(content)
    (work / SPOOL[spool]).unlink()
    (work / SPOOL[spool]).symlink_to(victim)
    ran = mlx("embed", PHOTO, PHOTOS[1], "-m", model, "-o", out, "--resume", env=env)
    works_or_one_error(ran, "out.npy")
    assert victim.read_bytes() == content
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim"]


# ---------------------------------------------------------------------------------------------------------------
# 3. Reads without a size bound


def st_index(path: Path, metadata: dict, rows: int = 1) -> Path:
    """A safetensors index as mlx-vit writes it (`rows` zero rows of WIDTH), with this metadata."""
    tensor = {"dtype": "F32", "shape": [rows, WIDTH], "data_offsets": [0, 4 * rows * WIDTH]}
    header = {"__metadata__": {"format": "mlx-vit embeddings", "count": str(rows), **metadata}, "embeddings": tensor}
    data = json.dumps(header).encode()
    data += b" " * (-len(data) % 8)
    path.write_bytes(struct.pack("<Q", len(data)) + data + bytes(4 * rows * WIDTH))
    return path


def settings(model: Path) -> dict:
    """The metadata `embed -m MODEL` records: what `embed --resume` checks before it reads the paths."""
    return {"model": str(model), "normalize": "false", "all_tokens": "false", "image_size": "32"}


def npy_index(path: Path, rows: int = 1) -> Path:
    np.save(path, np.zeros((rows, WIDTH), np.float32))
    path.with_name(f"{path.stem}.paths.txt").write_text("".join(f"photos/{i}.png\n" for i in range(rows)))
    return path


def test_a_sparse_npy_paths_file_is_not_read_whole(model, env, tmp_path):
    index = npy_index(tmp_path / "i.npy")
    sparse(tmp_path / "i.paths.txt", b"photos/0.png\n")
    one_error(mlx("search", PHOTO, "--index", index, "-m", model, env=env), ("i.npy", "i.paths.txt"))


def test_a_sparse_paths_jsonl_of_a_safetensors_index_is_not_read_whole(model, env, tmp_path):
    index = st_index(tmp_path / "i.safetensors", {**settings(model), "paths_file": "i.paths.jsonl"})
    sparse(tmp_path / "i.paths.jsonl", b'"photos/0.png"\n')
    one_error(mlx("search", PHOTO, "--index", index, env=env), ("i.safetensors", "i.paths.jsonl"))


def jsonl_result(path: Path) -> bytes:
    return json.dumps({"path": str(path), "predictions": [{"label": "kept", "score": 0.5, "class_id": 1}]}).encode()


@pytest.mark.parametrize("format", ["jsonl", "csv"])
def test_a_sparse_resume_file_is_not_read_whole(model, env, photos, tmp_path, format):
    out = tmp_path / f"out.{format}"
    if format == "jsonl":
        finished = head = jsonl_result(photos[0]) + b"\n"
    else:  # the last image's rows may be set aside and redone; the ones before it are finished
        records = csv_records(photos[:2])
        finished, head = HEADER + records[0], HEADER + records[0] + records[1]
    sparse(out, head)
    ran = mlx("classify", photos[2], "-m", model, "-o", out, "--resume", "-k", "2", env=env)
    kept_or_refused(ran, out, b"", finished)


def test_paths_on_stdin_from_dev_zero_are_not_read_whole(model, env):
    ran = mlx("classify", "-", "-m", model, "--format", "jsonl", stdin="/dev/zero", env=env)
    clean(ran, (1,))
    assert 1 <= len(ran.errors) and len(ran.stderr) < 10_000, str(ran)


def test_a_stdin_line_longer_than_path_max_is_one_short_error_line(model, env):
    # (Whether the run goes on with the next line or ends stdin there is left open.)
    stdin = str(PHOTOS[1]).encode() + b"\n" + b"x" * 1_000_000 + b"\n" + str(PHOTO).encode() + b"\n"
    ran = mlx("classify", "-", "-m", model, "--format", "jsonl", stdin=stdin, env=env)
    one_error(ran)
    assert str(PHOTOS[1]) in [json.loads(line)["path"] for line in ran.stdout.splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# 4. Hangs


def test_thousands_of_folders_on_stdin_are_deduplicated_in_linear_time(model, env, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    folders = [root / f"f{i:05d}" for i in range(8000)]
    for folder in folders:
        folder.mkdir()
    shutil.copy(PHOTO, folders[0] / "a.png")
    stdin = "".join(f"{f}\n" for f in folders).encode()
    ran = mlx("classify", "-", "-m", model, "--format", "jsonl", stdin=stdin, env=env, timeout=20)
    clean(ran, (1,))  # the empty folders are errors, the run goes on
    assert len(ran.stdout.splitlines()) == 1 + 7999


def test_an_mlx_hostfile_that_is_a_fifo_does_not_hang(model, env, tmp_path, fifos):
    hostfile = fifos(tmp_path / "hosts.json")
    ran = mlx("classify", PHOTO, "-m", model, env={**env, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)})
    works_or_one_error(ran)


# ---------------------------------------------------------------------------------------------------------------
# 5. Tracebacks: resume files, index files, globs, full disks, long names, huge numbers

JSONL_DAMAGE = {
    "nested 100k deep": b"[" * 100_000 + b"]" * 100_000,
    "lone surrogate": b'{"path": "\\ud800", "predictions": []}',
    "number": b'{"path": 5, "predictions": []}',
    "null": b'{"path": null, "predictions": []}',
    "list": b'{"path": ["a"], "predictions": []}',
}


@pytest.mark.parametrize("damage", list(JSONL_DAMAGE))
def test_a_damaged_jsonl_line_stops_a_resume_in_one_line(model, env, photos, tmp_path, damage):
    out = tmp_path / "out.jsonl"
    before = jsonl_result(photos[0]) + b"\n" + JSONL_DAMAGE[damage] + b"\n" + jsonl_result(photos[1]) + b"\n"
    out.write_bytes(before)
    ran = mlx("classify", photos[2], "-m", model, "-o", out, "--resume", env=env)
    kept_or_refused(ran, out, before, before)  # every line is complete: nothing may be dropped


PATHS_JSONL = {
    "nested 100k deep": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "lone surrogate": b'"\\ud800"\n',
    "number": b"5\n",
    "null": b"null\n",
    "list": b'["a"]\n',
}


@pytest.mark.parametrize("command, damage", [("search", "nested 100k deep"), ("search", "lone surrogate"),
                                             *(("embed --resume", damage) for damage in PATHS_JSONL)])  # fmt: skip
def test_a_damaged_index_paths_jsonl_is_one_error(model, env, tmp_path, command, damage):
    index = st_index(tmp_path / "i.safetensors", {**settings(model), "paths_file": "i.paths.jsonl"})
    (tmp_path / "i.paths.jsonl").write_bytes(PATHS_JSONL[damage])
    before = index.read_bytes()
    if command == "search":
        ran = mlx("search", PHOTO, "--index", index, "--format", "json", env=env)
    else:
        ran = mlx("embed", PHOTOS[1], "-m", model, "-o", index, "--resume", env=env)
    works_or_one_error(ran, ("i.safetensors", "i.paths.jsonl"))
    if ran.returncode == 1 and command != "search":
        assert index.read_bytes() == before


def test_a_lone_surrogate_in_an_index_header_is_not_a_traceback(model, env, tmp_path):
    index = st_index(tmp_path / "i.safetensors", {**settings(model), "paths": '["\\ud800"]'})
    ran = mlx("embed", PHOTOS[1], "-m", model, "-o", index, "--resume", env=env)
    works_or_one_error(ran, "i.safetensors")


@pytest.mark.parametrize("paths_file", ["", "a\0b.paths.jsonl", "..", "../i.paths.jsonl", ".", "/etc/passwd"])
def test_an_index_paths_file_naming_nothing_readable_is_one_error(tmp_path, paths_file):
    (tmp_path / "i.paths.jsonl").write_text('"photos/0.png"\n')
    refused_by_the_reader(st_index(tmp_path / "i.safetensors", {"model": "m", "paths_file": paths_file}))


def refused_by_the_reader(index: Path) -> None:
    """Reading `index` (the library's reader, what search and embed --resume call) is one short line naming it."""
    from mlx_vit.embed import read_embeddings

    try:
        read_embeddings(index)
    except MlxVitError as error:
        assert "\n" not in str(error) and len(str(error)) <= MAX_LINE and index.name in str(error), str(error)
    else:
        raise AssertionError(f"{index.name} was read")


@pytest.mark.parametrize("shape, rows", [((4, 2**62), 0), ((4, -1, -8), 32), ((4, 2**61, 2**61), 0)],
                         ids=["4x2^62", "negative", "4x2^61x2^61"])  # fmt: skip
def test_an_npy_index_shape_that_overflows_is_one_error(tmp_path, shape, rows):
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    index = tmp_path / "i.npy"
    index.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(4 * rows))
    (tmp_path / "i.paths.txt").write_text("".join(f"p{i}.png\n" for i in range(shape[0])))
    refused_by_the_reader(index)


def test_a_glob_over_a_very_deep_tree_is_not_a_traceback(model, env, tmp_path):
    levels = [tmp_path / "deep"]
    for _ in range(1500):  # ~3,000 characters: a valid path
        levels.append(levels[-1] / "d")
    try:
        for level in levels:
            level.mkdir()
        shutil.copy(PHOTO, levels[-1] / "x.png")
        ran = mlx("classify", "deep/**/*.png", "-m", model, "--format", "jsonl", env=env, cwd=tmp_path)
        works_or_one_error(ran)
        if ran.returncode == 0:
            assert len(ran.stdout.splitlines()) == 1
    finally:  # bottom up: pytest's own clean-up (shutil.rmtree) recurses, and fails on this tree
        (levels[-1] / "x.png").unlink(missing_ok=True)
        for level in reversed(levels):
            if level.exists():
                level.rmdir()


@pytest.fixture
def index(model, tmp_path) -> Path:
    from mlx_vit.embed import write_embeddings

    path = tmp_path / "index.safetensors"
    write_embeddings(path, [np.ones((2, WIDTH), np.float32)], ["a.png", "b.png"], str(model),
                     {k: v for k, v in settings(model).items() if k != "model"})  # fmt: skip
    return path


def test_a_classify_table_on_a_full_disk_is_one_error(model, env):
    one_error(mlx("classify", PHOTO, "-m", model, "--format", "table", "-o", "/dev/full", env=env), "/dev/full")


def test_classify_printing_a_table_to_a_full_stdout_is_one_error(model, env):
    one_error(mlx("classify", PHOTO, "-m", model, stdout="/dev/full", env=env))


@pytest.mark.parametrize("format", ["table", "json"])
def test_search_printing_to_a_full_stdout_is_one_error(model, env, index, format):
    one_error(mlx("search", PHOTO, "--index", index, "--format", format, stdout="/dev/full", env=env))


@pytest.mark.parametrize("args", [["--version"], ["--help"]], ids=" ".join)
def test_version_and_help_printed_to_a_full_stdout_are_one_error(env, args):
    one_error(mlx(*args, stdout="/dev/full", env=env))


def test_explain_to_a_name_too_long_is_one_error(model, env, tmp_path):
    one_error(mlx("explain", PHOTO, "-m", model, "-o", "a" * 300 + ".png", env=env, cwd=tmp_path))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png"]


def test_explain_of_a_photo_with_a_long_valid_name_works_or_is_one_error(model, env, tmp_path):
    photo = tmp_path / ("b" * 246 + ".png")  # 250 bytes: a valid name; "<stem>-rollout.png" would be 258
    shutil.copy(PHOTO, photo)
    work = tmp_path / "work"
    work.mkdir()
    ran = mlx("explain", photo, "-m", model, env=env, cwd=work)
    works_or_one_error(ran)
    written = [p.name for p in work.iterdir()]
    assert len(written) == (1 if ran.returncode == 0 else 0) and all(n.endswith(".png") for n in written), written


def test_embed_to_a_long_valid_name_works_or_is_one_error(model, env, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    name = "c" * 245 + ".npy"  # 249 bytes: valid, but ".NAME.paths.jsonl" beside it is not
    ran = mlx("embed", PHOTO, "-m", model, "-o", work / name, env=env)
    works_or_one_error(ran)
    left = sorted(p.name for p in work.iterdir())
    assert left == ([name, "c" * 245 + ".paths.txt"] if ran.returncode == 0 else []), left


BIG = 10**400  # a JSON integer of 401 digits: float() of it overflows


@pytest.mark.parametrize("key", ["image_mean", "image_std", "rescale_factor"])
def test_a_huge_integer_in_preprocessor_config_is_one_error(vit_folder, env, tmp_path, key):
    folder = tmp_path / "model"
    shutil.copytree(vit_folder, folder)
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config[key] = [BIG, 0.5, 0.5] if key == "image_mean" else BIG
    path.write_text(json.dumps(config))
    ran = mlx("classify", PHOTO, "-m", folder, env=env)
    works_or_one_error(ran, "preprocessor_config.json")


@pytest.mark.parametrize("where", ["init_values", "crop_pct"])
def test_a_huge_integer_in_an_mlx_folder_config_is_one_error(model, env, tmp_path, where):
    folder = tmp_path / "mlx"
    shutil.copytree(model, folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if where == "init_values":
        config["model"]["init_values"] = BIG
    else:
        config["preprocessing"].update(crop_mode="center", crop_pct=BIG, do_center_crop=True,
                                       crop_size={"height": 32, "width": 32})  # fmt: skip
    path.write_text(json.dumps(config))
    (folder / "manifest.json").unlink(missing_ok=True)  # a folder edited by hand
    one_error(mlx("classify", PHOTO, "-m", folder, env=env), "config.json")


def test_a_huge_integer_in_a_timm_config_is_one_error(env, tmp_path):
    folder = tmp_path / "timm"
    folder.mkdir()
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 10, "model_args": {"init_values": BIG},
              "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.9}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    one_error(mlx("classify", PHOTO, "-m", folder, env=env), "timm")


# ---------------------------------------------------------------------------------------------------------------
# 5-6. Numbers from the command line and the environment; every error line bounded

DIGITS_5000, DIGITS_4000 = "9" * 5000, "9" * 4000


@pytest.mark.parametrize("options", [
    ["--method", "last", "--head", "²"],
    ["--method", "last", "--head", DIGITS_5000],
    ["--method", "last", "--head", DIGITS_4000],
    ["--method", "cls", "--layer", DIGITS_5000],
    ["--method", "cls", "--layer", DIGITS_4000],
], ids=["head-superscript", "head-5000-digits", "head-4000-digits", "layer-5000-digits",
        "layer-4000-digits"])  # fmt: skip
def test_explain_numbers_are_refused_in_one_short_line(model, env, tmp_path, options):
    ran = mlx("explain", PHOTO, "-m", model, "-o", tmp_path / "e.png", *options, env=env)
    clean(ran, (1, 2))  # a usage error (2) or a refusal (1)
    assert not (tmp_path / "e.png").exists()


@pytest.mark.parametrize("value", ["²", DIGITS_5000, "1" + "0" * 30], ids=["superscript", "5000-digits", "10^30"])
@pytest.mark.parametrize("variable", ["MLX_VIT_CPU_LANES", "OPENBLAS_NUM_THREADS"])
def test_thread_and_lane_counts_from_the_environment_never_traceback(model, env, variable, value):
    ran = mlx("classify", PHOTO, "-m", model, "--format", "jsonl", env={**env, variable: value})
    works_or_one_error(ran, variable)
    if ran.returncode == 0:
        assert json.loads(ran.stdout)["path"] == str(PHOTO)


def test_a_100kb_path_on_stdin_is_one_short_error_line(model, env):
    ran = mlx("classify", "-", "-m", model, stdin=b"/tmp/" + b"x" * 100_000 + b".png\n", env=env)
    one_error(ran)


# ---------------------------------------------------------------------------------------------------------------
# A second pass of the red team over the fixes


def test_a_hard_link_planted_as_a_spool_file_is_never_written(model, env, tmp_path):
    work = tmp_path / "work"
    out = make_spool(work, model, json.dumps({"path": str(PHOTO)}).encode() + b"\n")
    victim = tmp_path / "victim"
    victim.write_bytes(np.ones((1, WIDTH), np.float32).tobytes() + b"precious")
    (work / SPOOL["rows"]).unlink()
    os.link(victim, work / SPOOL["rows"])
    ran = mlx("embed", PHOTO, PHOTOS[1], "-m", model, "-o", out, "--resume", env=env)
    assert "hard links" in one_error(ran, SPOOL["rows"])
    assert victim.read_bytes() == np.ones((1, WIDTH), np.float32).tobytes() + b"precious"


def test_a_long_multibyte_line_on_stdin_is_one_error_and_the_end_of_stdin(model, env):
    """PATH_MAX counts bytes: 2,049 two-byte characters are over it, and what follows on the line is no path."""
    line = ("é" * 2049).encode() + str(PHOTO).encode() + b"\n"
    ran = mlx("classify", "-", "-m", model, "--format", "jsonl", stdin=line + str(PHOTOS[1]).encode() + b"\n", env=env)
    assert "over 4,096 bytes" in one_error(ran)
    assert ran.stdout.count('"predictions"') == 0, ran.stdout


def _shell(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=HANG,
                          env={**os.environ, **env})  # fmt: skip


@pytest.mark.parametrize(
    "args", ["--help", "classify {photo} -m {model} --format jsonl", "classify {photo} -m {model}"]
)
def test_a_closed_stdout_is_one_error(model, env, args):
    command = f"{sys.executable} -m mlx_vit {args.format(photo=PHOTO, model=model)} >&-"
    done = _shell(command, env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and "stdout" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("format", ["table", "jsonl"])
def test_a_reader_that_goes_away_is_one_error(model, env, format):
    """`| true`: rich's own handling of a closed pipe ended the run with no word (and no summary)."""
    done = _shell(f"{sys.executable} -m mlx_vit classify {PHOTO} -m {model} --format {format} | true", env)
    assert "error: stdout: cannot write (Broken pipe)" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_explain_replaces_neither_file_when_one_cannot_be_written(model, env, tmp_path):
    keep = tmp_path / "keep.png"
    keep.write_bytes(b"OLD")
    (tmp_path / "dir.npy").mkdir()
    ran = mlx("explain", PHOTO, "-m", model, "-o", keep, "--save-npy", tmp_path / "dir.npy", "--force", env=env)
    one_error(ran, "dir.npy")
    assert keep.read_bytes() == b"OLD"


def test_a_fifo_named_as_the_blas_is_not_waited_on(env, tmp_path, fifos):
    ran = mlx("--version", env={**env, "MLX_VIT_BLAS": str(fifos(tmp_path / "blas.so"))})
    clean(ran, (0,))


def test_a_symbolic_link_in_the_model_cache_is_never_written_through(vit_folder, env, tmp_path):
    from checkpoints import lay_into_hf_cache

    lay_into_hf_cache(vit_folder, tmp_path / "hf", "org/name")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "mlx-vit").mkdir()
    (tmp_path / "mlx-vit" / "org--name").symlink_to(elsewhere)
    ran = mlx("classify", PHOTO, "-m", "org/name", env=env)
    assert "symbolic link" in one_error(ran, "org--name")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("command", ["classify", "embed", "explain"])
def test_an_output_named_as_a_folder_is_refused_not_written_as_a_file(model, env, tmp_path, command):
    """`-o results/`: a Path drops the slash, and a file named `results` was written."""
    ran = mlx(command, PHOTO, "-m", model, "-o", f"{tmp_path}/results/", env=env)
    clean(ran, (2,))
    assert "names a folder" in ran.stderr and not (tmp_path / "results").exists()


@pytest.mark.parametrize("command", ["classify", "embed", "explain"])
def test_an_output_named_dash_is_refused_not_written_as_a_file(model, env, tmp_path, command):
    """`-o -` (stdout, as `-` is stdin among the inputs) wrote a file named `-` in the current folder."""
    ran = mlx(command, PHOTO, "-m", model, "-o", "-", env=env, cwd=tmp_path)
    clean(ran, (2,))
    assert "'-' is not a file name" in ran.stderr and list(tmp_path.iterdir()) == []


def test_a_resume_starts_over_from_a_spool_killed_before_its_first_batch(model, env, tmp_path):
    """rows and meta without a paths file (another model's, even): removed, never kept under this run's rows."""
    work = tmp_path / "work"
    out = make_spool(work, model)  # no paths file
    meta = json.loads((work / SPOOL["meta"]).read_text())
    (work / SPOOL["meta"]).write_text(json.dumps({**meta, "model": "another/model"}) + "\n")
    clean(mlx("embed", PHOTO, "-m", model, "-o", out, "--resume", env=env), (0,))
    assert (out.parent / "out.paths.txt").read_text().splitlines() == [str(PHOTO)]
    assert sorted(p.name for p in work.iterdir()) == ["out.npy", "out.paths.txt"]


def test_a_model_name_a_safetensors_index_cannot_hold_is_refused_before_the_run(model, env, tmp_path):
    """A model folder whose name holds an undecodable byte: json would write it as a lone surrogate, which no
    safetensors reader takes; refused before anything is embedded (a .npy index records no model)."""
    odd = tmp_path / os.fsdecode(b"m\xff")
    shutil.copytree(model, odd)
    ran = mlx("embed", PHOTO, "-m", odd, "-o", tmp_path / "i.safetensors", env=env)
    assert "not UTF-8" in one_error(ran, "i.safetensors")
    assert not (tmp_path / "i.safetensors").exists()
    clean(mlx("embed", PHOTO, "-m", odd, "-o", tmp_path / "i.npy", env=env), (0,))
