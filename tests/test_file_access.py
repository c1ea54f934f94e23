"""Every file the package reads or writes goes through mlx_vit/files.py, the safe-file primitives (a regular file
only, bounded reads, strict JSON, O_EXCL | O_NOFOLLOW for what it writes beside an output), or is on the short
list below, each with the reason it is safe. A new `open(`, `json.loads` or `np.memmap` anywhere else fails here:
route it through the primitives, or add it to the list with its reason, for a reviewer to read.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRIMITIVES = "mlx_vit/files.py"

# Calls that open, read, write or parse a file (or bytes from outside).
FUNCTIONS = {"open"}
METHODS = {"read_text", "read_bytes", "write_text", "write_bytes"}
QUALIFIED = {("json", "load"), ("json", "loads"), ("np", "load"), ("np", "memmap"), ("np", "fromfile"),
             ("np", "loadtxt"), ("mx", "load"), ("os", "open"), ("Image", "open"), ("pickle", "load"),
             ("pickle", "loads"), ("torch", "load"), ("shutil", "copyfile"), ("shutil", "copy"), ("os", "fdopen"),
             ("zipfile", "ZipFile")}  # fmt: skip

# (file, enclosing function, call): why it is safe there.
ALLOWED = {
    ("mlx_vit/outputs.py", "Output.stream", "open"): "the -o file the user named, opened as a shell's > opens it "
    "(a resumed one was read through open_regular first; a new resumable one with 'x', O_EXCL)",
    ("mlx_vit/outputs.py", "ResultCodec.decode", "json.loads"): "bytes from another rank of the same run "
    "(mlx.launch), not a file",
    ("mlx_vit/runs.py", "EmbeddedCodec.decode", "json.loads"): "bytes from another rank of the same run",
    ("mlx_vit/images.py", "open_image", "Image.open"): "the file object open_regular opened, with its size "
    "and pixel count bounded",
    ("mlx_vit/outputs.py", "Output.stream", "os.fdopen"): "the descriptor temporary_beside created (O_EXCL)",
    ("mlx_vit/spool.py", "EmbeddingSpool._open", "os.fdopen"): "descriptors create_beside / open_beside opened",
    ("convert/torch_pickle.py", "read_torch_bin", "zipfile.ZipFile"): "the file open_regular opened, its archive "
    "checked by zip_archive.check_archive before any member is read",
    ("convert/jax_npz.py", "read_npz", "zipfile.ZipFile"): "the file open_regular opened, checked by "
    "zip_archive.check_archive",
    ("mlx_vit/embed.py", "read_index", "np.memmap"): "the file object open_regular opened, its shape checked "
    "against the file's size first",
    ("mlx_vit/spool.py", "EmbeddingSpool.close", "np.memmap"): "the spool's rows, opened by open_regular "
    "without following links, their size checked first",
    ("convert/mlx_folder.py", "read_mlx_folder", "mx.load"): "/dev/fd of the file open_regular opened, its "
    "header checked by header_of first",
    ("convert/timm_vit.py", "table", "json.loads"): "the package's own data file",
    ("convert/timm_vit.py", "imagenet_labels", "read_text"): "the package's own data file",
    ("convert/timm_vit.py", "table", "read_text"): "the package's own data file",
    ("mlx_vit/blas.py", "cpu_flags", "open"): "/proc/cpuinfo",
    ("mlx_vit/bench.py", "_machine", "read_text"): "/proc/cpuinfo",
    ("mlx_vit/bench.py", "_Worker.__init__", "open"): "the worker's log, in bench's own temporary folder",
    ("mlx_vit/bench.py", "_Worker._read", "read_text"): "the worker's log, in bench's own temporary folder",
    ("mlx_vit/bench.py", "_Worker._read", "json.loads"): "a line from bench's own worker process",
    ("mlx_vit/bench_worker.py", "peak_rss_mb", "open"): "/proc/self/status",
    ("mlx_vit/bench_worker.py", "_serve", "json.loads"): "a line from the bench process that started it",
    ("mlx_vit/bench_worker.py", "_main", "json.loads"): "its argument, from the bench process that started it",
    ("mlx_vit/cli/errors.py", "silence", "os.open"): "/dev/null",
    ("mlx_vit/cli/__init__.py", "main", "open"): "/dev/null, for a stderr the shell closed",
}


def _calls(path: Path) -> list[tuple[str, str, int]]:
    """(enclosing function's qualified name, call, line) of each file call in a module."""
    found = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call):
                func, name = child.func, None
                if isinstance(func, ast.Name) and func.id in FUNCTIONS:
                    name = func.id
                elif isinstance(func, ast.Attribute):
                    owner = func.value.id if isinstance(func.value, ast.Name) else None
                    if (owner, func.attr) in QUALIFIED:
                        name = f"{owner}.{func.attr}"
                    elif func.attr in METHODS:
                        name = func.attr
                if name is not None:
                    found.append((".".join(scope) or "<module>", name, child.lineno))
            visit(child, scope)

    visit(ast.parse(path.read_text(), str(path)), [])
    return found


def _modules() -> list[Path]:
    return sorted([*ROOT.glob("mlx_vit/**/*.py"), *ROOT.glob("convert/*.py")])


def test_files_are_read_and_written_through_the_primitives():
    seen, unlisted = set(), []
    for module in _modules():
        name = module.relative_to(ROOT).as_posix()
        if name == PRIMITIVES:
            continue
        for scope, call, line in _calls(module):
            key = (name, scope, call)
            if key in ALLOWED:
                seen.add(key)
            else:
                unlisted.append(f"{name}:{line} {scope}: {call}(...)")
    assert not unlisted, "file access outside mlx_vit/files.py:\n" + "\n".join(unlisted)
    assert set(ALLOWED) == seen, f"allowed calls that are gone (take them off the list): {set(ALLOWED) - seen}"


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan itself: each kind of call is found, with the function it is in."""
    module = tmp_path / "m.py"
    module.write_text(
        "import json, numpy as np\n"
        "def f(p):\n    return open(p).read()\n"
        "class C:\n    def g(self, p):\n        return json.loads(p.read_text())\n"
        "    def h(self, p):\n        np.memmap(p)\n        p.write_bytes(b'')\n"
    )
    assert [(s, c) for s, c, _ in _calls(module)] == [
        ("f", "open"), ("C.g", "json.loads"), ("C.g", "read_text"), ("C.h", "np.memmap"), ("C.h", "write_bytes")
    ]  # fmt: skip
