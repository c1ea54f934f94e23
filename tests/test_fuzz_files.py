"""Property tests (hypothesis) for the readers of the library's own files: indexes (`embed`'s .npy and
.safetensors with their paths), outputs being resumed (jsonl and csv) and embed's spools.

Whatever the bytes, each reader returns what it promises or raises its typed error with one line that names the
file; a resume never touches the finished part of an output. CI runs a few hundred examples per target;
FUZZ_EXAMPLES=N runs N per target (see tests/test_fuzz.py for the same settings):

    FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_files.py -p no:cacheprovider
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import _mutate, _mutations, fuzz

from mlx_vit.classify import Prediction, Result
from mlx_vit.embed import Embedded, IndexFileError, paths_file, read_index, write_embeddings
from mlx_vit.errors import LINE_LIMIT, OutputError
from mlx_vit.files import path_string
from mlx_vit.outputs import Output, ResultWriter
from mlx_vit.resume import Done, read_done
from mlx_vit.spool import EmbeddingSpool

# Paths and labels of every awkward kind: quotes, commas, line breaks, a lone CR, undecodable bytes, non-ASCII.
PATHS = ["a.png", 'b, "c".png', "d\ne.png", "f\rg.png", "h\udcff.png", "é/猫.png", "i,j\r\n.png", "k.png"]
LABELS = ["cat", "a, b", 'say "x"', "two\nlines", "cr\rlf\r\n", "", " pad "]


def _one_line(error: Exception, *names: Path) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message and len(message) < 2 * LINE_LIMIT, repr(message)
    assert any(str(name) in message for name in names), message


def _results() -> list[Result]:
    out = []
    for i, path in enumerate(PATHS):
        if i % 5 == 4:
            out.append(Result(path, error=f"{path!r}: cannot decode image"))
        else:
            labels = [LABELS[(i + j) % len(LABELS)] for j in range(3)]
            out.append(Result(path, [Prediction(label, 1 / (j + 2 + i), j) for j, label in enumerate(labels)]))
    return out


def _output(folder: Path, format: str) -> bytes:
    path = folder / f"seed.{format}"
    writer = ResultWriter(Output(path, format), "model")
    for start in range(0, len(PATHS), 3):
        writer.write(_results()[start : start + 3])
    writer.close()
    return path.read_bytes()


_OUTPUT_SEEDS: dict[str, bytes] = {}


def _output_seed(tmp_path_factory, format: str) -> bytes:
    if format not in _OUTPUT_SEEDS:
        _OUTPUT_SEEDS[format] = _output(tmp_path_factory.mktemp("seed"), format)
    return _OUTPUT_SEEDS[format]


def _quote_edits(seed_len: int):
    """Damage csv and JSON readers care about: quotes, commas, line breaks and braces at random places."""
    return st.lists(st.tuples(st.integers(0, seed_len), st.sampled_from([b'"', b",", b"\n", b"\r\n", b"{", b"\\"])),
                    max_size=3)  # fmt: skip


@fuzz(200)
@given(format=st.sampled_from(["jsonl", "csv"]), data=st.data())
def test_fuzz_resume_never_touches_the_finished_part(tmp_path_factory, format, data):
    """An output resumed (and closed with nothing new) keeps the bytes its reader called finished, unchanged."""
    seed = _output_seed(tmp_path_factory, format)
    raw = _mutate(seed, data.draw(_mutations(len(seed))))
    for position, chunk in sorted(data.draw(_quote_edits(len(raw))), reverse=True):
        raw = raw[:position] + chunk + raw[position:]
    folder = tmp_path_factory.mktemp("resume")
    path = folder / f"out.{format}"
    path.write_bytes(raw)
    try:
        done, end, tail = read_done(path, format)
    except OutputError as error:
        _one_line(error, path)
        assert path.read_bytes() == raw  # refused: untouched
        return
    assert 0 <= end <= len(raw) and (tail is None or end <= tail.end <= len(raw))
    kept = tail.end if tail is not None else end
    writer = ResultWriter(Output(path, format, resume=True), "model")
    writer.close()
    assert path.read_bytes()[:kept] == raw[:kept]  # nothing finished is rewritten or lost
    assert len(done) <= raw.count(b"\n")


@fuzz(100)
@given(cut=st.integers(0, 10**6), format=st.sampled_from(["jsonl", "csv"]))
def test_fuzz_resume_after_a_cut_keeps_every_whole_image(tmp_path_factory, cut, format):
    """A run killed after any byte: resuming with every input again ends with exactly the uncut file."""
    seed = _output_seed(tmp_path_factory, format)
    cut %= len(seed) + 1
    folder = tmp_path_factory.mktemp("cut")
    path = folder / f"out.{format}"
    path.write_bytes(seed[:cut])
    output = Output(path, format, resume=True)
    writer = ResultWriter(output, "model")
    for start in range(0, len(PATHS), 3):
        writer.write([r for r in _results()[start : start + 3] if r.path not in output.done])
    writer.close()
    assert path.read_bytes() == seed


def _index_seed(folder: Path, kind: str) -> list[Path]:
    """An index of every kind mlx-vit writes; its files (the index first)."""
    rows = np.arange(len(PATHS) * 3, dtype=np.float32).reshape(len(PATHS), 3)
    paths = [p for p in PATHS if kind == "safetensors" or "\n" not in p]
    rows = rows[: len(paths)]
    if kind == "npy":
        index = folder / "i.npy"
        write_embeddings(index, [rows], paths, "m")
        return [index, paths_file(index)]
    index = folder / "i.safetensors"
    if kind == "listed":
        from mlx_vit import embed

        original = embed._fits_in_header
        embed._fits_in_header = lambda text: False  # as a library too large for the header writes it
        try:
            write_embeddings(index, [rows], paths, "m", {"normalize": "false"})
        finally:
            embed._fits_in_header = original
        return [index, folder / "i.paths.jsonl"]
    write_embeddings(index, [rows], paths, "m", {"normalize": "false"})
    return [index]


@fuzz(300)
@given(kind=st.sampled_from(["npy", "safetensors", "listed"]), which=st.integers(0, 1), data=st.data())
def test_fuzz_index(tmp_path_factory, kind, which, data):
    folder = tmp_path_factory.mktemp("index")
    files = _index_seed(folder, kind)
    target = files[which % len(files)]
    seed = target.read_bytes()
    target.write_bytes(_mutate(seed, data.draw(_mutations(len(seed)))))
    try:
        vectors, paths, settings = read_index(files[0])
    except IndexFileError as error:
        _one_line(error, *files)
        return
    assert vectors.dtype == np.float32 and vectors.ndim >= 2 and len(paths) == len(vectors)
    assert all(path_string(p) == p for p in paths)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in settings.items())
    np.asarray(vectors[:2])  # the memory map reads
    [Done.key(p) for p in paths]


def _spool_seed(folder: Path) -> tuple[Path, list[Path]]:
    """A spool killed after two batches: the output's path and its spool files."""
    index = folder / "out.npy"
    spool = EmbeddingSpool(index, "m", (3,))
    for start in (0, 3):
        spool.write([Embedded(p, np.full(3, i, np.float32)) if i % 4 else Embedded(p, error="broken")
                     for i, p in enumerate(PATHS[start : start + 3], start) if "\n" not in p])  # fmt: skip
    spool.abort()
    return index, [spool.paths_path, spool.rows_path, spool.meta_path]


@fuzz(200)
@given(which=st.integers(0, 2), data=st.data())
def test_fuzz_spool(tmp_path_factory, which, data):
    """A damaged spool resumes from what is whole, or is refused in one line; its index holds only whole rows."""
    folder = tmp_path_factory.mktemp("spool")
    index, files = _spool_seed(folder)
    seed = files[which].read_bytes()
    files[which].write_bytes(_mutate(seed, data.draw(_mutations(len(seed)))))
    try:
        spool = EmbeddingSpool(index, "m", (3,), resume=True)
        spool.close()
    except OutputError as error:
        _one_line(error, index, *files)
        return
    vectors, paths, _ = read_index(index)
    assert len(paths) == len(vectors) <= 6 and all(path_string(p) == p for p in paths)
    assert not any(f.exists() for f in files)  # the spool is gone once the index is written
    shutil.rmtree(folder)
