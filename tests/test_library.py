"""Whole libraries through the real CLI: folders and stdin, every output format, resume after a kill, progress,
FIFOs and hostile names, embed and search."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from checkpoints import PHOTOS, run_cli

from mlx_vit.classify import load
from mlx_vit.outputs import result_json
from mlx_vit.resume import CSV_HEADER


def make_library(root, copies: int = 3):
    """`copies` nested folders of the repo's photos, a hidden file and folder (skipped) and a note (not an image)."""
    for i in range(copies):
        folder = root / f"album {i}" / ("sub" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        for photo in PHOTOS:
            shutil.copy(photo, folder / photo.name)
    (root / ".hidden").mkdir()
    shutil.copy(PHOTOS[0], root / ".hidden" / "x.png")
    shutil.copy(PHOTOS[0], root / ".dotted.png")
    (root / "notes.txt").write_text("not an image")
    return root


def expected_paths(root) -> list[str]:
    """The library's images in the documented order: depth first, names sorted, hidden ones left out."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, f) for f in sorted(files) if not f.startswith(".") and f != "notes.txt"]
    return found


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return make_library(tmp_path_factory.mktemp("library"))


def reference(vit_folder, paths, env, *options) -> list[dict]:
    """What one fresh `mlx-vit classify PATHS --format jsonl OPTIONS` process prints. (This process's own results
    can differ in the last bits: the BLAS, and how it splits work over threads, are per process.)"""
    done = run_cli("classify", *paths, "-m", vit_folder, "--format", "jsonl", *options, env=env)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def assert_close(ours: list[dict], theirs: list[dict]) -> None:
    """The same paths, labels and class ids in the same order; scores equal up to float rounding."""
    assert [(r["path"], [(p["label"], p["class_id"]) for p in r["predictions"]]) for r in ours] == [
        (r["path"], [(p["label"], p["class_id"]) for p in r["predictions"]]) for r in theirs
    ]
    scores = (
        [[p["score"] for p in r["predictions"]] for r in ours],
        [[p["score"] for p in r["predictions"]] for r in theirs],
    )
    assert np.allclose(*scores, rtol=0, atol=1e-6)


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_to_jsonl_equals_the_library(vit_folder, library, tmp_path, isolated):
    out = tmp_path / "out.jsonl"
    done = run_cli("classify", library, "-m", vit_folder, "-o", out, env=isolated)
    assert done.returncode == 0, done.stderr
    paths = expected_paths(library)
    assert [r["path"] for r in jsonl(out)] == paths
    assert_close(jsonl(out), [result_json(r) for r in load(str(vit_folder)).classify_files(paths)])
    assert jsonl(out) == reference(vit_folder, paths, isolated)  # as a list of files gives it, exactly
    assert done.stdout == ""
    assert done.stderr.strip().startswith(f"{len(paths)} classified, 0 failed in ")  # the summary line only


def test_globs_stdin_and_duplicates(vit_folder, library, isolated):
    first = expected_paths(library)[0]
    stdin = f"{first}\n{PHOTOS[1]}\n"
    done = subprocess.run([sys.executable, "-m", "mlx_vit", "classify", str(library / "album 0" / "*.png"), "-",
                           first, "-m", str(vit_folder), "--format", "jsonl"], input=stdin, capture_output=True,
                          text=True, env={**os.environ, **isolated}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    pngs = sorted(str(p) for p in (library / "album 0").glob("*.png"))
    assert [json.loads(line)["path"] for line in done.stdout.splitlines()] == [*pngs, str(PHOTOS[1])]


def test_csv_and_json_are_exact_with_threshold(vit_folder, library, tmp_path, isolated):
    paths = expected_paths(library)[:8]
    want = reference(vit_folder, paths, isolated, "--threshold", "0.1")
    done = run_cli("classify", *paths, "-m", vit_folder, "-o", tmp_path / "o.csv", "--threshold", "0.1", env=isolated)
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(io.StringIO((tmp_path / "o.csv").read_text(), newline="")))
    assert rows[0] == CSV_HEADER
    assert rows[1:] == [[r["path"], str(rank), p["label"], repr(p["score"]), str(p["class_id"]), ""]
                        for r in want for rank, p in enumerate(r["predictions"], 1)]  # fmt: skip
    assert all(p["score"] >= 0.1 for r in want for p in r["predictions"])
    done = run_cli("classify", *paths, "-m", vit_folder, "-o", tmp_path / "o.json", "--threshold", "0.1", env=isolated)
    assert json.loads((tmp_path / "o.json").read_text()) == want


def kill_midway(command, model, paths, output, written, env, lines: int = 5, sig=signal.SIGKILL) -> tuple[int, str]:
    """Signal `mlx-vit COMMAND - -o OUTPUT` once `written` has `lines` lines; (exit code, stderr). The paths go on
    stdin, which stays open, so the run waits for more and the signal lands mid-run whatever the machine's speed."""
    run = subprocess.Popen([sys.executable, "-m", "mlx_vit", command, "-", "-m", str(model), "-o", str(output),
                            "--batch-size", "1", "--workers", "1"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, **env})  # fmt: skip
    run.stdin.write("".join(f"{p}\n" for p in paths))
    run.stdin.flush()
    deadline = time.monotonic() + 120
    while (not written.exists() or written.read_text().count("\n") < lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=120)
    return run.returncode, stderr


def test_killed_run_resumes_with_every_image_once(vit_folder, library, tmp_path, isolated):
    paths = expected_paths(library)
    out = tmp_path / "out.jsonl"
    kill_midway("classify", vit_folder, paths[:12], out, out, isolated)
    finished = out.read_bytes()
    assert finished.count(b"\n") >= 5
    out.write_bytes(finished + finished.splitlines(keepends=True)[0][:40])  # and a half-written last line
    done = run_cli("classify", library, "-m", vit_folder, "-o", out, "--resume", "--batch-size", "1", env=isolated)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(finished)  # finished results are never rewritten
    # Every image exactly once, in order (batches of one, as before the kill: a batch's size changes the rounding).
    assert jsonl(out) == reference(vit_folder, paths, isolated, "--batch-size", "1")
    skipped = finished.count(b"\n")
    assert f"{skipped} skipped" in done.stderr


def test_ctrl_c_keeps_what_was_finished_and_says_how_to_go_on(vit_folder, library, tmp_path, isolated):
    out = tmp_path / "out.csv"
    code, stderr = kill_midway("classify", vit_folder, expected_paths(library)[:12], out, out, isolated, 3,
                               signal.SIGINT)  # fmt: skip
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().endswith(", then interrupted; --resume goes on from there")
    rows = list(csv.reader(io.StringIO(out.read_text(), newline="")))
    assert rows[0] == CSV_HEADER and len(rows) > 3


def test_csv_resume_redoes_a_cut_last_image(vit_folder, library, tmp_path, isolated):
    paths = expected_paths(library)[:6]
    out = tmp_path / "out.csv"
    assert run_cli("classify", *paths, "-m", vit_folder, "-o", out, "--batch-size", "1", env=isolated).returncode == 0
    whole = out.read_text()
    out.write_text(whole[: whole.index(paths[3])] + paths[3] + ",1,cl")  # killed inside image 4's rows
    done = run_cli("classify", *paths, "-m", vit_folder, "-o", out, "--resume", "--batch-size", "1", env=isolated)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == whole


def test_an_existing_output_needs_resume(vit_folder, tmp_path, isolated):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    done = run_cli("classify", PHOTOS[0], "-m", vit_folder, "-o", out, env=isolated)
    assert done.returncode == 1 and "--resume" in done.stderr
    assert out.read_text() == "precious\n"


def test_fifos_are_refused_without_blocking_and_the_rest_run(vit_folder, tmp_path, isolated):
    folder = tmp_path / "lib"
    folder.mkdir()
    shutil.copy(PHOTOS[0], folder / "a.png")
    os.mkfifo(folder / "b.png")
    shutil.copy(PHOTOS[1], folder / "c.png")
    os.mkfifo(tmp_path / "named.jpg")
    done = run_cli("classify", folder, tmp_path / "named.jpg", "-m", vit_folder, "--format", "jsonl", env=isolated)
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["path"] for r in lines] == [str(folder / n) for n in ("a.png", "b.png", "c.png")] + [
        str(tmp_path / "named.jpg")
    ]
    assert "predictions" in lines[0] and "predictions" in lines[2] and "FIFO" in lines[1]["error"]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("FIFO" in e for e in errors)


def test_control_characters_in_names_are_escaped_in_the_table(vit_folder, tmp_path, isolated):
    folder = tmp_path / "lib"
    folder.mkdir()
    shutil.copy(PHOTOS[0], folder / "evil\x1b]0;pwned\x07.png")
    done = run_cli("classify", folder, "-m", vit_folder, env={**isolated, "COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "evil\\x1b]0;pwned\\x07.png" in done.stdout


def run_in_pty(*args, env):
    """The CLI with stderr on a pseudo-terminal; (exit code, what the terminal showed)."""
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "mlx_vit", *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=follower, env={**os.environ, **env, "COLUMNS": "120"})  # fmt: skip
    os.close(follower)
    shown = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(leader)
    return child.wait(timeout=300), shown.decode("utf-8", "replace")


def test_progress_bar_only_on_a_terminal(vit_folder, library, tmp_path, isolated):
    code, shown = run_in_pty("classify", library, "-m", vit_folder, "-o", tmp_path / "a.jsonl", env=isolated)
    count = len(expected_paths(library))
    assert code == 0 and "images/s" in shown and f"{count}/{count}" in shown
    done = run_cli("classify", library, "-m", vit_folder, "-o", tmp_path / "b.jsonl", env=isolated)
    assert done.stderr.count("\n") == 1 and "/" not in done.stderr.split(" in ")[0]  # the summary line only


def test_embed_then_search_finds_each_photo_itself_first(vit_folder, library, tmp_path, isolated):
    index = tmp_path / "library.safetensors"
    done = run_cli("embed", library, "-m", vit_folder, "-o", index, env=isolated)
    assert done.returncode == 0, done.stderr
    assert "embedded, 0 failed" in done.stderr
    queries = [str(p) for p in PHOTOS[:3]]
    done = run_cli("search", *queries, "--index", index, "-k", "3", "--format", "json", env=isolated)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    names = {p: p.rsplit("/", 1)[1] for p in expected_paths(library)}
    for query, answer in zip(queries, answers, strict=True):
        best = answer["matches"][0]
        assert names[best["path"]] == os.path.basename(query) and best["similarity"] == pytest.approx(1.0, abs=1e-6)
        assert len(answer["matches"]) == 3
    table = run_cli("search", queries[0], "--index", index, "-k", "2", env=isolated)
    assert table.returncode == 0 and "1.0000" in table.stdout


def test_embed_resume_extends_the_spool_after_a_kill(vit_folder, library, tmp_path, isolated):
    from mlx_vit.embed import read_embeddings

    paths = expected_paths(library)
    index = tmp_path / "i.npy"
    spool = tmp_path / ".i.npy.paths.jsonl"
    kill_midway("embed", vit_folder, paths[:10], index, spool, isolated)
    assert not index.exists()
    done = run_cli("embed", library, "-m", vit_folder, "-o", index, "--resume", "--batch-size", "1", env=isolated)
    assert done.returncode == 0, done.stderr
    assert not spool.exists()
    vectors, written, _ = read_embeddings(index)
    assert written == paths
    run_cli("embed", library, "-m", vit_folder, "-o", tmp_path / "whole.npy", "--batch-size", "1", env=isolated)
    assert (vectors == read_embeddings(tmp_path / "whole.npy")[0]).all()


MLX_LAUNCH = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or shutil.which("mlx.launch")


@pytest.mark.skipif(MLX_LAUNCH is None, reason="mlx.launch is not installed")
@pytest.mark.parametrize("command, name", [("classify", "out.jsonl"), ("embed", "out.safetensors")])
def test_two_ranks_under_mlx_launch_write_what_one_process_writes(command, name, vit_folder, library, tmp_path,
                                                                   isolated):  # fmt: skip
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"{ranks}-{name}"
        cli = [sys.executable, "-m", "mlx_vit", command, str(library), "-m", str(vit_folder), "-o", str(out),
               "--batch-size", "1"]  # fmt: skip
        launch = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--"] if ranks == 2 else []
        done = subprocess.run(launch + cli, capture_output=True, text=True, env={**os.environ, **isolated},
                              timeout=300)  # fmt: skip
        assert done.returncode == 0 and out.exists(), done.stderr
        outputs[ranks] = out.read_bytes()
    # Byte for byte: the same inputs in the same order, each in a forward pass of the same shape.
    assert outputs[1] == outputs[2]


def test_the_python_api_writes_what_the_cli_writes(vit_folder, library, tmp_path, isolated):
    api = f"""
import mlx_vit
stats = mlx_vit.classify_library(mlx_vit.load({str(vit_folder)!r}), [{str(library)!r}], {str(tmp_path / "api.csv")!r},
                                 format="csv")
print(stats.done, stats.failed, len(list(mlx_vit.find_inputs([{str(library)!r}]))))
"""
    done = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, env={**os.environ, **isolated},
                          timeout=300)  # fmt: skip
    count = len(expected_paths(library))
    assert done.stdout.split() == [str(count), "0", str(count)], done.stderr
    assert run_cli("classify", library, "-m", vit_folder, "-o", tmp_path / "cli.csv", env=isolated).returncode == 0
    assert (tmp_path / "api.csv").read_bytes() == (tmp_path / "cli.csv").read_bytes()


def test_embed_resume_after_the_index_was_written_but_not_its_spool_removed(vit_folder, library, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    import mlx_vit
    from mlx_vit.embed import read_embeddings
    from mlx_vit.spool import EmbeddingSpool

    index = tmp_path / "i.safetensors"
    classifier = mlx_vit.load(str(vit_folder))
    with monkeypatch.context() as patched:  # as if killed right after the index was renamed into place
        patched.setattr(EmbeddingSpool, "_remove_spool", lambda self: None)
        mlx_vit.embed_library(classifier, [library], index)
    assert (tmp_path / ".i.safetensors.paths.jsonl").exists()
    mlx_vit.embed_library(classifier, [library], index, resume=True)
    assert read_embeddings(index)[1] == expected_paths(library)  # each once, not the spool's twice
    assert not (tmp_path / ".i.safetensors.paths.jsonl").exists()


def test_embed_resume_refuses_other_settings_and_search_finds_a_relative_model(vit_folder, library, tmp_path,
                                                                                isolated):  # fmt: skip
    index = tmp_path / "i.safetensors"
    done = run_cli("embed", library, "-m", vit_folder.name, "-o", index, env=isolated, cwd=vit_folder.parent)
    assert done.returncode == 0, done.stderr
    again = run_cli("embed", library, "-m", vit_folder, "-o", index, "--resume", "--normalize", env=isolated)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "normalize false" in again.stderr
    found = run_cli("search", PHOTOS[0], "--index", index, "--format", "json", env=isolated, cwd=tmp_path)
    assert found.returncode == 0, found.stderr  # the index names the model by its absolute path


def test_embed_resume_when_the_rows_fell_behind_the_paths(vit_folder, library, tmp_path, isolated):
    from mlx_vit.embed import read_embeddings

    paths = expected_paths(library)
    index, spool = tmp_path / "i.npy", tmp_path / ".i.npy.paths.jsonl"
    kill_midway("embed", vit_folder, paths[:10], index, spool, isolated)
    rows = tmp_path / ".i.npy.rows"
    rows.write_bytes(rows.read_bytes()[: -4 * 32 - 7])  # a power cut: the last row and a half never reached it
    done = run_cli("embed", library, "-m", vit_folder, "-o", index, "--resume", "--batch-size", "1", env=isolated)
    assert done.returncode == 0, done.stderr
    run_cli("embed", library, "-m", vit_folder, "-o", tmp_path / "whole.npy", "--batch-size", "1", env=isolated)
    vectors, written, _ = read_embeddings(index)
    assert written == paths and (vectors == read_embeddings(tmp_path / "whole.npy")[0]).all()
