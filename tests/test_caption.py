"""mlx_eve.caption: one line per image found, unreadable images as error lines, resuming, CSV, Ctrl-C."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from processes import restore_ctrl_c

from mlx_eve.commands import caption

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"path", "prompt", "answer", "prompt_tokens", "image_tokens", "generation_tokens", "seconds"}


@pytest.fixture
def photos(tmp_path):
    """A folder of images, one of them corrupt, one a JPEG to be turned upright, with a sub-folder, a hidden
    folder and a text file; returns the folder and the images a search should find, in order."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    for i, size in enumerate([(120, 80), (80, 120), (100, 100)]):
        Image.new("RGB", size, (40 * i, 120, 200)).save(root / f"{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°, so the stored 120x80 picture is 80x120 upright
    Image.new("RGB", (120, 80), "red").save(root / "sub" / "rotated.jpg", exif=exif)
    (root / "broken.jpg").write_bytes(b"not a JPEG at all")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (64, 64)).save(root / ".thumbnails" / "0.png")
    names = ["0.png", "1.png", "2.png", "broken.jpg", "sub/rotated.jpg"]
    return root, [str(root / name) for name in names]


def run_caption(model, *args):
    return caption.main(["--model", str(model), "--max-tokens", "3", "--batch-size", "2", *args])


def lines(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_gives_one_line_per_image_in_order_and_a_bad_image_an_error_line(v2_path, photos, tmp_path, capsys):
    root, found = photos
    out = tmp_path / "answers.jsonl"
    assert run_caption(v2_path, "--images", str(root), "--output", str(out), "-p", "What is it?") == 0
    rows = lines(out)
    assert [row["path"] for row in rows] == found
    error = rows[3]
    assert set(error) == {"path", "error"} and "broken.jpg" in error["error"]
    assert "1 could not be read (error lines)" in capsys.readouterr().out
    for row in rows[:3] + rows[4:]:
        assert set(row) == FIELDS and row["prompt"] == "What is it?"
        assert 0 < row["image_tokens"] < row["prompt_tokens"] and 1 <= row["generation_tokens"] <= 3
    by_name = {Path(row["path"]).name: row for row in rows}
    assert (
        by_name["rotated.jpg"]["image_tokens"] == by_name["1.png"]["image_tokens"] != by_name["0.png"]["image_tokens"]
    )

    assert run_caption(v2_path, "--images", str(root), "--output", str(out), "--overwrite", "--max-size", "64") == 0
    assert all(
        small["image_tokens"] < row["image_tokens"] for small, row in zip(lines(out), rows) if "error" not in row
    )


def test_a_second_run_redoes_nothing_and_a_partial_one_finishes(v2_path, photos, tmp_path, monkeypatch, capsys):
    root, found = photos
    out = tmp_path / "answers.jsonl"
    assert run_caption(v2_path, "--images", str(root), "--output", str(out)) == 0
    complete = out.read_text()

    import mlx_eve.loading

    monkeypatch.setattr(mlx_eve.loading, "load", lambda *a, **k: pytest.fail("nothing to do, yet a model is loaded"))
    assert run_caption(v2_path, "--images", str(root), "--output", str(out)) == 0
    assert out.read_text() == complete and f"All {len(found)} images are already in" in capsys.readouterr().out
    monkeypatch.undo()

    # Two lines kept and half of a third, as a run killed mid-write could leave.
    kept = complete.splitlines(keepends=True)[:2]
    out.write_text("".join(kept) + complete.splitlines()[2][:20])
    assert run_caption(v2_path, "--images", str(root), "--output", str(out)) == 0
    assert out.read_text().startswith("".join(kept))
    assert [row["path"] for row in lines(out)] == found  # one line per image, none twice
    assert "2 of 5 images are already in" in capsys.readouterr().out

    assert run_caption(v2_path, "--images", str(root), "--output", str(out), "--overwrite") == 0
    assert [row["path"] for row in lines(out)] == found


def test_csv_has_the_same_columns_and_resumes(v2_path, photos, tmp_path, capsys):
    root, found = photos
    out = tmp_path / "answers.csv"  # the extension chooses CSV
    assert run_caption(v2_path, "--images", str(root / "*.png"), str(root / "sub"), "--output", str(out)) == 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == caption.COLUMNS
    assert [row["path"] for row in rows] == found[:3] + found[4:]
    assert all(int(row["image_tokens"]) > 0 and row["error"] == "" for row in rows)
    before = out.read_text()
    assert run_caption(v2_path, "--images", str(root), "--output", str(out)) == 0
    after = out.read_text()
    assert after.startswith(before) and after.count("\n") == before.count("\n") + 1  # broken.jpg's error line
    assert "4 of 5 images are already in" in capsys.readouterr().out


@pytest.mark.parametrize("format", caption.FORMATS)
def test_an_incomplete_last_line_is_cut_off_even_with_newlines_and_quotes_in_answers(tmp_path, format):
    out = tmp_path / f"answers.{format}"
    output = caption.Output(out, format, overwrite=False)
    start, ends = out.stat().st_size, []  # after the CSV header; after each line
    for i, answer in enumerate(['a "quoted"\nanswer, on two lines', "plain", 'ends with "\n']):
        output.write({"path": f"{i}.png", "answer": answer})
        ends.append(out.stat().st_size)
    output.close()
    whole = out.read_bytes()
    for cut in range(len(whole) + 1):
        out.write_bytes(whole[:cut])
        caption.Output(out, format, overwrite=False).close()
        complete = [i for i, end in enumerate(ends) if end <= cut]
        assert out.read_bytes() == whole[: max([start] + [ends[i] for i in complete])], cut
        assert caption.Output(out, format, overwrite=False).done == {f"{i}.png" for i in complete}, cut


def test_a_file_this_command_did_not_write_is_refused_and_left_as_it_was(tmp_path, photos, capsys):
    root, _ = photos
    out = tmp_path / "notes.jsonl"
    for text, format, message in [
        ("[1, 2]\n", "jsonl", "was not written by this command"),
        ("no newline at the end", "jsonl", "was not written by this command"),
        ('{"path": "a.png"}\n[1, 2]\n', "jsonl", f"{out}:2 is not a line this command wrote"),
        ("name,size\n", "csv", "was not written by this command"),
    ]:
        out.write_text(text)
        assert caption.main(["--images", str(root), "--output", str(out), "--format", format]) == 1
        assert message in capsys.readouterr().err and out.read_text() == text


def test_images_from_patterns_and_files_and_what_is_refused(photos, tmp_path, capsys):
    root, found = photos
    assert list(caption.find_images([str(root / "**" / "*.jpg"), str(root / "notes.txt"), found[0]])) == [
        Path(found[3]),
        Path(found[4]),
        root / "notes.txt",  # named outright: read whatever its name (and reported if it is no image)
        Path(found[0]),
    ]
    for argv, message in [
        (["--images", str(root / "nothing-*.png"), "-o", "x.jsonl"], "nothing matches the pattern"),
        (["--images", str(root / "*.txt"), "-o", "x.jsonl"], "No images"),
        (["--images", str(root), "-o", str(tmp_path / "no" / "x.jsonl")], "No such folder for --output"),
    ]:
        assert caption.main(argv) == 1
        assert message in capsys.readouterr().err
    for bad in (["--batch-size", "0"], ["--max-tokens", "-1"], ["--temp", "-1"], ["--format", "xml"]):
        with pytest.raises(SystemExit) as exit:
            caption.main(["--images", str(root), "-o", "x.jsonl", *bad])
        assert exit.value.code == 2 and capsys.readouterr().err.startswith("error: argument")


def test_ctrl_c_leaves_complete_lines_and_exit_130(v2_path, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(60):
        Image.new("RGB", (64 + i, 64), (i * 4, 90, 160)).save(root / f"{i:02d}.png")
    out = tmp_path / "answers.jsonl"
    argv = [sys.executable, "-m", "mlx_eve.caption", "--model", str(v2_path), "--images", str(root), "-o", str(out)]
    process = subprocess.Popen(
        [*argv, "--max-tokens", "200", "--batch-size", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=restore_ctrl_c,
    )
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2) and process.poll() is None:
        assert time.monotonic() < deadline, "no answers written"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "run again to go on" in stderr
    written = out.read_text()
    assert written.endswith("\n")
    rows = lines(out)
    assert 2 <= len(rows) < 60 and all(set(row) == FIELDS for row in rows)

    finish = subprocess.run([*argv, "--max-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert out.read_text().startswith(written)
    assert [row["path"] for row in lines(out)] == [str(root / f"{i:02d}.png") for i in range(60)]


def save_image(path, color="red"):
    Image.new("RGB", (64, 64), color).save(path, format="PNG")


@pytest.mark.parametrize("format", caption.FORMATS)
def test_a_name_that_is_not_utf8_is_answered_and_written_so_that_it_reads_back(v2_path, tmp_path, format, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    save_image(root / "a.png")
    odd = os.path.join(os.fsencode(root), b"b\xff.png")  # no UTF-8 name: as a folder from another system holds
    save_image(odd, "blue")
    save_image(root / "c.png", "green")
    out = tmp_path / f"answers.{format}"
    assert run_caption(v2_path, "--images", str(root), "--output", str(out)) == 0
    assert "3 answered;" in capsys.readouterr().out

    raw = out.read_bytes()
    if format == "jsonl":
        rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]  # still all UTF-8
        assert all(set(row) == FIELDS for row in rows)
    else:
        assert b"/b\xff.png," in raw  # the name's own bytes
        with open(out, newline="", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
        assert all(row["error"] == "" and int(row["image_tokens"]) > 0 for row in rows)
    assert [os.fsencode(row["path"]) for row in rows] == [os.fsencode(root / "a.png"), odd, os.fsencode(root / "c.png")]

    assert run_caption(v2_path, "--images", str(root), "--output", str(out)) == 0
    assert out.read_bytes() == raw and "All 3 images are already in" in capsys.readouterr().out


def test_broken_links_and_what_is_no_regular_file_get_error_lines(v2_path, tmp_path, capsys):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    save_image(root / "a.png")
    (root / "gone.png").symlink_to("missing.png")
    os.mkfifo(root / "pipe.png")  # never opened: reading it would wait for a writer
    save_image(root / "sub" / "z.png")
    named = tmp_path / "named.png"
    named.symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "answers.jsonl"
    assert run_caption(v2_path, "--images", str(root), str(named), "--output", str(out)) == 0
    assert "2 answered, 3 could not be read (error lines)" in capsys.readouterr().out
    rows = lines(out)
    paths = [root / "a.png", root / "gone.png", root / "pipe.png", root / "sub" / "z.png", named]
    assert [row["path"] for row in rows] == [str(path) for path in paths]
    assert set(rows[0]) == set(rows[3]) == FIELDS
    assert rows[1] == {
        "path": str(root / "gone.png"),
        "error": f"Could not read image {root / 'gone.png'}: a broken symbolic link (to missing.png).",
    }
    assert rows[2] == {
        "path": str(root / "pipe.png"),
        "error": f"Could not read image {root / 'pipe.png'}: not a regular file.",
    }
    assert set(rows[4]) == {"path", "error"} and "broken symbolic link" in rows[4]["error"]

    written = out.read_text()
    assert run_caption(v2_path, "--images", str(root), str(named), "--output", str(out)) == 0
    assert out.read_text() == written and "All 5 images are already in" in capsys.readouterr().out


@contextmanager
def without_permissions():
    """Run the block as a user whom mode 000 keeps out: as it is, or, for root (who reads everything), with the
    effective user nobody."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_files_and_folders_without_read_permission_get_error_lines(v2_path, tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0:
        try:
            with without_permissions():
                pass
        except PermissionError:
            pytest.skip("running as root, and not allowed to change the effective user")
    # Outside the test's own folder, which another user could not enter.
    root = Path(tempfile.mkdtemp(prefix="caption-permissions-"))
    try:
        os.chmod(root, 0o755)
        save_image(root / "a.png")
        (root / "open").mkdir()
        save_image(root / "open" / "b.png")
        (root / "private").mkdir()
        save_image(root / "private" / "inside.png")
        save_image(root / "secret.png")
        os.chmod(root / "private", 0)
        os.chmod(root / "secret.png", 0)

        find_images = caption.find_images

        def find_without_permissions(sources):
            with without_permissions():
                return find_images(sources)

        monkeypatch.setattr(caption, "find_images", find_without_permissions)
        out = tmp_path / "answers.jsonl"
        assert run_caption(v2_path, "--images", str(root), "--output", str(out)) == 0
        assert "2 answered, 2 could not be read (error lines)" in capsys.readouterr().out
        rows = lines(out)
        assert [row["path"] for row in rows] == [
            str(root / name) for name in ["a.png", "open/b.png", "private", "secret.png"]
        ]
        assert set(rows[0]) == set(rows[1]) == FIELDS
        assert rows[2]["error"] == f"Could not search folder {root / 'private'}: permission denied."
        assert rows[3]["error"] == f"Could not read image {root / 'secret.png'}: permission denied."

        written = out.read_text()
        assert run_caption(v2_path, "--images", str(root), "--output", str(out)) == 0
        assert out.read_text() == written and "All 4 images are already in" in capsys.readouterr().out
    finally:
        for locked in (root / "private", root / "secret.png"):
            os.chmod(locked, 0o755)
        shutil.rmtree(root)
