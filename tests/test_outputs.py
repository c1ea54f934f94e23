"""Output writers: exact csv and json, batches on disk as they finish, resume that keeps finished work."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from mlx_vit.classify import Prediction, Result
from mlx_vit.errors import OutputError
from mlx_vit.outputs import FORMATS, RESULTS, CsvFormat, Format, Output, ResultWriter, format_for
from mlx_vit.resume import CSV_HEADER, READERS, Done, read_done

TRICKY = [
    "plain",
    "a, b",
    'say "cheese"',
    "two\nlines",
    "cr\rlf\r\n",
    "café ☕ 猫",
    "",
    " padded ",
    "\\back",
    "\r",
    "lone\rcr",
]


def results(start: int = 0, count: int = 4) -> list[Result]:
    out = []
    for i in range(start, start + count):
        if i % 4 == 3:
            out.append(Result(f'dir/{i}, odd "name".png', error=f"dir/{i}: cannot decode image (broken)"))
            continue
        labels = [TRICKY[(i + j) % len(TRICKY)] for j in range(3)]
        predictions = [Prediction(label, 1 / (j + 3 + i), i * 10 + j) for j, label in enumerate(labels)]
        out.append(Result(f"dir/{i}.png", predictions))
    return out


def write(path, format, batches, resume=False, top_k=None):
    output = Output(path, format, resume)
    writer = ResultWriter(output, "model", top_k, 1000)
    for batch in batches:
        writer.write(batch)
    writer.close()
    return output


def test_csv_round_trips_every_label_and_score_exactly(tmp_path):
    path = tmp_path / "out.csv"
    batch = results(0, 8)
    write(path, "csv", [batch[:5], batch[5:]])
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == CSV_HEADER
    expected = []
    for r in batch:
        if r.error:
            expected.append([r.path, "", "", "", "", r.error])
        else:
            expected += [[r.path, str(k), p.label, repr(p.score), str(p.class_id), ""]
                         for k, p in enumerate(r.predictions, 1)]  # fmt: skip
    assert rows[1:] == expected
    assert [float(row[3]) for row in rows[1:4]] == [p.score for p in batch[0].predictions]  # bit for bit


def test_json_is_the_array_json_dumps_writes(tmp_path):
    batch = results(0, 6)
    write(tmp_path / "out.json", "json", [batch[:2], batch[2:3], batch[3:]])
    as_dicts = [{"path": r.path, "error": r.error} if r.error else
                {"path": r.path, "predictions": [vars(p) for p in r.predictions]} for r in batch]  # fmt: skip
    assert (tmp_path / "out.json").read_text() == json.dumps(as_dicts, indent=2) + "\n"
    write(tmp_path / "empty.json", "json", [])
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_jsonl_lines_are_on_disk_after_each_batch_and_parse_strictly(tmp_path):
    path = tmp_path / "out.jsonl"
    output = Output(path, "jsonl")
    writer = ResultWriter(output, "model")
    writer.write(results(0, 2))
    assert len(path.read_text().splitlines()) == 2  # read through another handle before the run ends
    writer.write(results(2, 3))
    assert len(path.read_text().splitlines()) == 5
    writer.close()

    def strict(name):
        raise ValueError(name)

    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=strict)


def test_json_and_table_appear_only_when_complete(tmp_path):
    for format in ("json", "table"):
        path = tmp_path / f"out.{format}"
        output = Output(path, format)
        writer = ResultWriter(output, "model")
        writer.write(results(0, 2))
        assert not path.exists()
        output.abort()
        assert list(tmp_path.iterdir()) == []


def test_a_long_table_comes_in_tables_of_table_rows_images(tmp_path, monkeypatch):
    import mlx_vit.outputs

    monkeypatch.setattr(mlx_vit.outputs, "TABLE_ROWS", 3)
    path = tmp_path / "out.txt"
    write(path, "table", [results(0, 2), results(2, 1), results(3, 4)])
    first, second = path.read_text().split("mlx-vit · model")[1:]  # 2 held; 3, printed; 4, printed; none left
    assert [name in first for name in ("dir/0.png", "dir/2.png", "dir/4.png")] == [True, True, False]
    assert [name in second for name in ("dir/4.png", "dir/6.png")] == [True, True]


def test_nothing_is_created_before_the_first_write(tmp_path):
    output = Output(tmp_path / "out.jsonl", "jsonl")
    output.abort()
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_resume_and_resume_needs_a_resumable_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("")
    with pytest.raises(OutputError, match="already exists; --resume continues it"):
        Output(path, "jsonl")
    with pytest.raises(OutputError, match="--resume continues jsonl or csv output, not json"):
        Output(tmp_path / "x.json", "json", resume=True)
    with pytest.raises(OutputError, match="--resume needs -o FILE"):
        Output(None, "jsonl", resume=True)
    with pytest.raises(OutputError, match="is not a regular file, so it cannot be replaced"):
        Output(tmp_path, "jsonl")


@pytest.mark.parametrize("format", ["jsonl", "csv"])
def test_resume_after_a_kill_at_any_byte_ends_with_every_image_once(tmp_path, format):
    everything = results(0, 8)
    reference = tmp_path / f"reference.{format}"
    write(reference, format, [everything[:3], everything[3:6], everything[6:]])
    whole = reference.read_bytes()
    path = tmp_path / f"out.{format}"
    for cut in range(len(whole)):  # the run killed after `cut` bytes reached the file
        path.write_bytes(whole[:cut])
        done, end, _ = read_done(path, format)
        assert whole[:end].count(b"dir/") >= len(done)  # only what is finished counts as done
        write(path, format, [[r for r in everything if r.path not in done]], resume=True)
        assert path.read_bytes() == whole, cut
    # csv: the last image's rows may be cut short of their rank, so it is redone when it comes up again...
    done, end, tail = read_done(reference, format)
    assert [r.path in done for r in everything] == [True] * 8 if format == "jsonl" else [True] * 7 + [False]
    assert end == len(whole) if format == "jsonl" else whole[end:].startswith(b'"dir/7, odd')
    if format == "csv":  # ... and kept where it is when it does not (it would come first)
        assert tail.path == everything[7].path and tail.end == len(whole)
        path.write_bytes(whole + b'"dir/8')  # and a cut-off record after it
        write(path, format, [results(8, 2)], resume=True)
        assert path.read_bytes() == whole + b"".join(line for r in results(8, 2) for line in csv_lines(r))


def csv_lines(result) -> list[bytes]:
    text = io.StringIO()
    csv.writer(text).writerows(CsvFormat.rows(result))
    return [text.getvalue().encode()]


def test_resume_refuses_a_file_that_is_not_mlx_vit_output(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"path": "x", "error": "x: broken"}\nnot json\n')
    with pytest.raises(OutputError, match="line 2 is not an mlx-vit result; not resuming"):
        Output(tmp_path / "a.jsonl", "jsonl", resume=True)
    (tmp_path / "a.jsonl").write_text('{"path": "x"}\n')  # a path alone (a spool's line) is no result
    with pytest.raises(OutputError, match="line 1 is not an mlx-vit result; not resuming"):
        Output(tmp_path / "a.jsonl", "jsonl", resume=True)
    (tmp_path / "a.csv").write_text("name,score\nx,1\n")
    with pytest.raises(OutputError, match="does not start with mlx-vit's csv header"):
        Output(tmp_path / "a.csv", "csv", resume=True)


def _predicted(path: str, ranks: int, label: str = "cat") -> Result:
    return Result(path, [Prediction(label, 1 / (rank + 2), rank) for rank in range(ranks)])


def test_a_resume_with_other_inputs_never_writes_an_image_twice_or_moves_it(tmp_path):
    """The file's last image is done when it holds as many ranks as the run makes, so it is skipped and stays where
    it is; one with fewer (cut short, or a threshold) is redone only if it comes first, and kept if not."""
    path = tmp_path / "out.csv"
    write(path, "csv", [[_predicted("horse.png", 3), _predicted("rocket.png", 3)]], top_k=3)
    whole = path.read_bytes()
    output = write(path, "csv", [[_predicted("chelsea.png", 3)], [_predicted("rocket.png", 3, "dog")]], resume=True,
                   top_k=3)  # fmt: skip
    assert "rocket.png" in output.done
    assert path.read_bytes() == whole + b"".join(csv_lines(_predicted("chelsea.png", 3)))
    path.unlink()
    write(path, "csv", [[_predicted("a.png", 3), _predicted("b.png", 2)]], top_k=3)  # b: fewer ranks than 3
    whole = path.read_bytes()
    write(path, "csv", [[_predicted("c.png", 3)], [_predicted("b.png", 3, "dog")]], resume=True, top_k=3)
    assert path.read_bytes() == whole + b"".join(csv_lines(_predicted("c.png", 3)))  # b kept, not written again


def test_records_mlx_vit_writes_are_read_back_however_long(tmp_path):
    """A label longer than the csv module's default field limit (131,072 characters) is a finished result."""
    path = tmp_path / "out.csv"
    write(path, "csv", [[_predicted("a.png", 1, "L" * 200_000)], [_predicted("b.png", 1, "L" * 200_000)]], top_k=1)
    whole = path.read_bytes()
    output = write(path, "csv", [[_predicted("c.png", 1)]], resume=True, top_k=1)
    assert "a.png" in output.done and "b.png" in output.done
    assert path.read_bytes() == whole + b"".join(csv_lines(_predicted("c.png", 1)))


@pytest.mark.parametrize("format", ["jsonl", "csv"])
@pytest.mark.parametrize("damage", ["CR line ends", "LF line ends and a stray quote", "a stray quote"])
def test_damage_that_would_swallow_finished_results_is_refused(tmp_path, format, damage):
    """Only the one record a kill cut short may be dropped: line ends mlx-vit does not write, or a quote that would
    run over the records after it, stop the resume and leave the file as it was."""
    if format == "jsonl" and damage != "CR line ends":
        return  # a stray quote in a jsonl line is simply not JSON (tested above)
    path = tmp_path / f"out.{format}"
    write(path, format, [results(0, 4), results(4, 4)])
    raw = path.read_bytes()
    if damage == "CR line ends":
        raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r")
    else:
        if "LF" in damage:
            raw = raw.replace(b"\r\n", b"\n")
        at = raw.index(b"dir/5.png")
        raw = raw[:at] + b'"' + raw[at:]
    path.write_bytes(raw)
    with pytest.raises(OutputError, match="not resuming"):
        Output(path, format, resume=True)
    assert path.read_bytes() == raw


@pytest.mark.parametrize(
    "format, text",
    [("csv", b"my notes, not results"), ("jsonl", b"my notes"), ("jsonl", b'{"path": "a.png", "error": "x"}\r')],
)
def test_a_last_line_that_is_no_start_of_a_result_is_refused_not_dropped(tmp_path, format, text):
    """Only what could be a result cut short is dropped: a user's one-line file without a newline was emptied."""
    path = tmp_path / f"notes.{format}"
    path.write_bytes(text)
    with pytest.raises(OutputError, match="not resuming"):
        Output(path, format, resume=True)
    assert path.read_bytes() == text


@pytest.mark.parametrize("format", ["jsonl", "csv"])
def test_an_error_for_any_path_given_is_read_back(tmp_path, format):
    """A failed input's path is whatever was given (a NUL in it, or 10,000 bytes): its record must resume."""
    path = tmp_path / f"out.{format}"
    failed = [Result("a\0b.png", error="not a path"), Result("x" * 10_000 + ".png", error="file name too long")]
    write(path, format, [failed])
    output = write(path, format, [[_predicted("c.png", 1)]], resume=True, top_k=1)
    assert all(r.path in output.done for r in failed)


def test_an_empty_csv_still_has_its_header_and_an_image_under_the_threshold_a_row(tmp_path):
    write(tmp_path / "empty.csv", "csv", [])
    assert (tmp_path / "empty.csv").read_text() == ",".join(CSV_HEADER) + "\n"
    write(tmp_path / "none.csv", "csv", [[Result("a.png", [])]])
    assert list(csv.reader(io.StringIO((tmp_path / "none.csv").read_text())))[1] == ["a.png", "", "", "", "", ""]


def test_done_holds_hashes_of_paths():
    done = Done(__import__("numpy").array([Done.key("a"), Done.key("é/b\udc80")], dtype="uint64"))
    assert "a" in done and "é/b\udc80" in done and "b" not in done and "" not in Done()


def test_results_travel_between_ranks_exactly():
    batch = results(0, 8)
    assert RESULTS.decode(RESULTS.encode(batch)) == batch


def test_the_format_follows_the_extension_unless_given():
    assert [format_for(p, None) for p in ("a.csv", "a.JSONL", "a.json", "a.txt", None)] == [
        "csv", "jsonl", "json", "table", "table"]  # fmt: skip
    assert format_for("a.txt", "jsonl") == "jsonl" and format_for(None, "csv") == "csv"
    assert format_for("a.CSV", "csv") == "csv"


def test_an_extension_that_names_another_format_is_refused():
    with pytest.raises(OutputError) as info:
        format_for("x.jsonl", "csv")
    assert str(info.value) == ("-o x.jsonl --format csv: the extension .jsonl names jsonl output, not csv; name the "
                               "file for csv, or leave --format out")  # fmt: skip
    with pytest.raises(OutputError, match="names csv output, not table"):
        format_for("x.csv", "table")


def test_finished_paths_match_however_they_are_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = Done(np.array([Done.key(str(tmp_path / "photos" / "a.png"))], np.uint64))
    assert "photos/a.png" in done and "./photos//a.png" in done and "photos/b.png" not in done


def test_each_format_is_one_class_named_in_the_registry():
    assert list(FORMATS) == ["table", "json", "jsonl", "csv"]
    assert all(issubclass(kind, Format) and kind.name == name for name, kind in FORMATS.items())
    assert [name for name, kind in FORMATS.items() if kind.resumable] == list(READERS)  # resume.py reads them
    suffixes = {name: kind.suffix for name, kind in FORMATS.items() if kind.suffix}
    assert suffixes == {"json": ".json", "jsonl": ".jsonl", "csv": ".csv"}
    assert all(format_for(f"out{suffix}", None) == name for name, suffix in suffixes.items())


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_reads_back_through_resume_if_it_is_resumable(tmp_path, name):
    """A finished output resumed with the same inputs keeps every image and gains nothing; one that cannot be
    resumed says so."""
    path = tmp_path / f"out.{name}"
    write(path, name, [results(0, 3), results(3, 3)], top_k=3)
    whole = path.read_bytes()
    if not FORMATS[name].resumable:
        with pytest.raises(OutputError, match=f"--resume continues jsonl or csv output, not {name}"):
            Output(path, name, resume=True)
        return
    writer = ResultWriter(Output(path, name, resume=True), "model", 3, 1000)
    assert [r.path in writer.done for r in results(0, 6)] == [True] * 6
    writer.write([r for r in results(0, 6) if r.path not in writer.done])
    writer.close()
    assert path.read_bytes() == whole


class PathsFormat(Format):
    """A format the package does not have: the paths classified, a line each."""

    name = "paths"
    suffix = ".paths"

    def write(self, results):
        self.output.append("".join(r.path + "\n" for r in results))


def test_a_new_format_is_one_class_in_the_registry(tmp_path, monkeypatch):
    monkeypatch.setitem(FORMATS, "paths", PathsFormat)
    path = tmp_path / "out.paths"
    assert format_for(path, None) == "paths"
    output = Output(path, "paths")
    writer = ResultWriter(output, "model")
    writer.write(results(0, 2))
    assert not path.exists()  # not resumable: written whole, moved into place at the end
    writer.write(results(2, 2))
    writer.close()
    assert path.read_text() == "".join(r.path + "\n" for r in results(0, 4))


def test_an_error_does_not_replace_a_resumed_csv_s_last_image(tmp_path):
    """Its rows may be cut short of their ranks, but they are a result: a failure to read it again keeps them."""
    path = tmp_path / "out.csv"
    write(path, "csv", [[_predicted("a.png", 3), _predicted("b.png", 2)]], top_k=3)  # b: fewer ranks than 3
    whole = path.read_bytes()
    write(path, "csv", [[Result("b.png", error="b.png: cannot decode image")], [_predicted("c.png", 3)]],
          resume=True, top_k=3)  # fmt: skip
    assert path.read_bytes() == whole + b"".join(csv_lines(_predicted("c.png", 3)))
