"""Finding a run's inputs: files, folders, globs and stdin, in order, each once, streamed, nothing opened."""

from __future__ import annotations

import io
import os
import shutil
import socket

import pytest
from checkpoints import IMAGES
from PIL import Image

from mlx_vit import inputs
from mlx_vit.images import FORMATS
from mlx_vit.inputs import IMAGE_EXTENSIONS, count_inputs, find_inputs


def found(*arguments, stdin: str = "") -> list[tuple[str, str | None]]:
    return [(i.path, i.error) for i in find_inputs([str(a) for a in arguments], io.StringIO(stdin))]


def paths(*arguments, stdin: str = "") -> list[str]:
    return [p for p, _ in found(*arguments, stdin=stdin)]


@pytest.fixture
def library(tmp_path):
    """lib/ with nested folders, hidden ones, a non-image, upper-case extensions and a symlink loop."""
    lib = tmp_path / "lib"
    for name in ["b/2.png", "b/1.JPG", "a.png", "c/d/e.webp", "c/z.tif", ".hidden/x.png", "b/.y.png", "c/notes.txt",
                 "c/d/.deep/q.png", "m.png"]:  # fmt: skip
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(IMAGES / "chelsea.png", lib / name)
    (lib / "c" / "loop").symlink_to(lib)
    return lib


def test_extensions_are_what_pillow_registers_for_the_formats_read():
    Image.init()
    registered = {ext for ext, fmt in Image.registered_extensions().items() if fmt in FORMATS}
    heif = {".heic", ".heics", ".heif", ".heifs", ".hif"}  # pillow-heif registers them only once enabled
    assert IMAGE_EXTENSIONS == registered | heif


def test_a_folder_is_walked_depth_first_in_name_order_skipping_hidden_and_non_images(library):
    names = [os.path.relpath(p, library) for p in paths(library)]
    assert names == ["a.png", "b/1.JPG", "b/2.png", "c/d/e.webp", "c/z.tif", "m.png"]


def test_named_files_are_taken_whatever_their_extension_and_in_argument_order(library):
    notes, hidden = library / "c" / "notes.txt", library / ".hidden" / "x.png"
    assert found(notes, hidden, library / "m.png") == [(str(notes), None), (str(hidden), None),
                                                       (str(library / "m.png"), None)]  # fmt: skip


def test_every_path_appears_once(library):
    a, m = str(library / "a.png"), str(library / "m.png")
    everything = paths(library)
    assert paths(library, library) == everything
    assert paths(a, library) == [a] + [p for p in everything if p != a]  # named first, then skipped in the walk
    assert paths(library, a, m) == everything  # inside a folder walked before
    assert paths(library / "b", library) == paths(library / "b") + [p for p in everything if "/b/" not in p]
    assert paths(library, library / "c") == everything
    assert paths(a, "./" + os.path.relpath(a)) == [a]  # the same file, spelled two ways
    # A hidden folder named after its parent was walked is not inside that walk.
    assert paths(library, library / ".hidden") == everything + [str(library / ".hidden" / "x.png")]


def test_globs_walk_in_order_and_skip_hidden_names(library, monkeypatch):
    monkeypatch.chdir(library)
    assert paths("**/*.png") == ["a.png", "m.png", "b/2.png"]  # a folder's own matches, then its subfolders'
    assert paths("b/*") == ["b/1.JPG", "b/2.png"]
    # A folder a glob matches is walked like a named one (a link inside is not followed).
    assert paths("*") == ["a.png", "b/1.JPG", "b/2.png", "c/d/e.webp", "c/z.tif", "m.png"]
    assert paths(".*/*.png") == [".hidden/x.png"]
    assert paths(str(library / "c" / "**" / "*.webp")) == [str(library / "c" / "d" / "e.webp")]
    assert found("nothing-*.png") == [("nothing-*.png", "nothing-*.png: no file matches this pattern")]


def test_a_globs_extension_matches_in_any_case_as_the_walk_does(tmp_path, monkeypatch):
    """Cameras write IMG_1234.JPG: `'trips/**/*.jpg'` takes it, as a walk of trips/ does; the rest of a name, and
    the folders, match as written (the file system tells them apart)."""
    names = ["trips/2020/IMG_1234.JPG", "trips/2020/img_1235.jpg", "trips/2020/IMG_1236.Jpg",
             "trips/2020/day/IMG_1237.JPG", "trips/2020/IMG_1238.jpeg", "trips/2020/IMG_1239.JPG.txt"]  # fmt: skip
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(IMAGES / "rocket.jpg", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    every_jpg = ["trips/2020/IMG_1234.JPG", "trips/2020/IMG_1236.Jpg", "trips/2020/img_1235.jpg",
                 "trips/2020/day/IMG_1237.JPG"]  # fmt: skip
    assert paths("trips/**/*.jpg") == every_jpg
    assert paths("trips/**/*.JPG") == every_jpg
    assert paths("trips/*/*.jpg") == every_jpg[:3]
    assert sorted(paths("trips/**/*.jpg") + ["trips/2020/IMG_1238.jpeg"]) == sorted(paths("trips"))
    assert paths("trips/**/IMG_*.jpg") == ["trips/2020/IMG_1234.JPG", "trips/2020/IMG_1236.Jpg",
                                           "trips/2020/day/IMG_1237.JPG"]  # fmt: skip
    assert paths("trips/**/*.jp?g") == ["trips/2020/IMG_1238.jpeg"]  # an extension with a wildcard: as written
    if not os.path.exists("TRIPS"):  # a case-sensitive file system (Linux; macOS's default is not)
        assert found("Trips/**/*.jpg") == [("Trips/**/*.jpg", "Trips/**/*.jpg: no file matches this pattern")]


def test_a_name_with_glob_characters_that_exists_is_taken_literally(tmp_path):
    odd = tmp_path / "[1] cat*.png"
    shutil.copy(IMAGES / "chelsea.png", odd)
    assert paths(odd) == [str(odd)]


def test_a_named_folder_without_images_is_one_error(library):
    none = library / "none"
    none.mkdir()
    (none / "notes.txt").write_text("not an image")
    assert found(none) == [(str(none), f"{none}: holds no image files (of the formats mlx-vit reads)")]
    assert str(none) not in paths(str(library / "*"))  # a folder a glob matches may be empty


def test_what_a_walk_skips_is_still_taken_when_named_after_it(library):
    (library / "c" / "README").write_text("a named file is taken whatever its name")
    (library / "c" / "linked").symlink_to(library / "b")  # a walk does not follow a symlinked folder
    after = paths(library / "c", library / "c" / "README", library / "c" / "linked")
    before = paths(library / "c" / "README", library / "c" / "linked", library / "c")
    assert sorted(after) == sorted(before)
    assert str(library / "c" / "README") in after and str(library / "c" / "linked" / "2.png") in after


def test_stdin_bytes_any_path_and_nul(library, monkeypatch):
    odd = library / "caf\udce9.png"  # a Latin-1 byte in a UTF-8 world: os.fsdecode's stand-in
    shutil.copy(IMAGES / "chelsea.png", odd)

    class Stdin:
        buffer = io.BytesIO(os.fsencode(odd) + b"\n" + b"a\0b.png\n")

    monkeypatch.setattr(inputs.sys, "stdin", Stdin)
    assert [(i.path, i.error) for i in find_inputs(["-"])] == [
        (str(odd), None), ("a\0b.png", "a\\x00b.png: not a path (it holds a NUL byte)")]  # fmt: skip


def test_stdin_paths_one_per_line(library):
    a, b = library / "a.png", library / "b"
    nope = library / "nope.png"
    lines = f"{a}\r\n\n{b}\n{a}\n{nope}"
    assert found("-", stdin=lines) == [(str(a), None), (str(b / "1.JPG"), None), (str(b / "2.png"), None),
                                       (str(nope), f"{nope}: no such file or folder")]  # fmt: skip


def test_fifos_sockets_and_devices_are_refused_without_being_opened(library, monkeypatch):
    fifo = library / "c" / "pipe.png"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    sock = library / "sock.png"
    try:
        server.bind(str(sock))
        opened = []
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
        results = dict(found(library, "/dev/null"))
        assert results[str(fifo)] == f"{fifo}: is a FIFO (named pipe), not an image file"
        assert results[str(sock)] == f"{sock}: is a socket, not an image file"
        assert results["/dev/null"] == "/dev/null: is a character device, not an image file"
        assert not opened
    finally:
        server.close()


def test_control_characters_in_names_are_escaped_in_error_lines(tmp_path):
    name = tmp_path / "evil\x1b]0;owned\x07.png"
    assert found(name) == [(str(name), f"{tmp_path}/evil\\x1b]0;owned\\x07.png: no such file or folder")]


def test_inputs_stream_a_large_tree_without_listing_it_first(tmp_path, monkeypatch):
    for i in range(30):
        (tmp_path / f"d{i:02}").mkdir()
        shutil.copy(IMAGES / "chelsea.png", tmp_path / f"d{i:02}" / "x.png")
    listed = []
    real = os.scandir
    monkeypatch.setattr(inputs.os, "scandir", lambda path: listed.append(path) or real(path))
    stream = find_inputs([str(tmp_path)])
    first = next(stream)
    assert first.path == str(tmp_path / "d00" / "x.png")
    assert len(listed) == 2  # the root and the first folder, not the 30
    assert len(list(stream)) == 29


def test_count_matches_what_is_found_and_is_unknown_for_stdin(library):
    assert count_inputs([str(library), str(library / "a.png"), "nope*"]) == len(paths(library, "nope*"))
    assert count_inputs(["-"]) is None


def test_a_glob_takes_no_folder_by_its_extension_in_another_case(tmp_path, monkeypatch):
    """Only a file's extension matches in any case (as the walk takes IMG_1.JPG): 'photos/*.jpg' walked a folder
    named album.JPG and took every image in it, its .png files too. A folder matches as written, as in the shell."""
    for name in ["photos/a.JPG", "photos/album.JPG/inner.png", "photos/trip.jpg/inner.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(IMAGES / "rocket.jpg", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert paths("photos/*.jpg") == ["photos/a.JPG", "photos/trip.jpg/inner.png"]
    assert paths("photos/*.JPG") == ["photos/a.JPG", "photos/album.JPG/inner.png"]


def test_a_double_star_twice_is_one(tmp_path, monkeypatch):
    """'**/**' is '**' (as in the shell): each more one multiplied the folders listed by the tree's depth (minutes
    for a 1,500-deep tree)."""
    folder = tmp_path / "deep"
    for _ in range(40):
        folder = folder / "d"
    folder.mkdir(parents=True)
    shutil.copy(IMAGES / "rocket.jpg", folder / "leaf.JPG")
    monkeypatch.chdir(tmp_path)
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(path) or real(path))
    assert len(paths("deep/**/*.jpg")) == 1
    once = len(listed)
    listed.clear()
    assert len(paths("deep/**/**/**/*.jpg")) == 1
    assert len(listed) == once
