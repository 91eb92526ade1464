"""Ask one question about many images: the ``caption`` command.

    python -m mlx_eve.caption --model M --images photos/ --prompt "Describe the image." --output answers.jsonl

Writes one line per image, in the order the images were found (sorted, folders searched recursively), each
complete and flushed as soon as its answer is: an interrupted run leaves a valid file, and running the same
command again answers only the images the file does not hold yet. With ``--json-schema`` every answer is a JSON
value that follows the schema (constrained decoding): in JSONL the value itself, in a CSV one column per
top-level property.
"""

import argparse
import csv
import glob
import io
import json
import os
import stat
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..arguments import COUNT, NON_NEGATIVE, ArgumentParser, add_model_options, json_schema_file
from ..errors import EVEError, ImageError, run_cli, shorten
from .generate import read_prompt

# What a folder or a pattern contributes; a file named outright is read whatever its name.
IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
    ".pnm", ".tga", ".ico",
}  # fmt: skip
# The columns of both formats. An image that could not be read has only path and error; an answer whose JSON
# is incomplete has no answer, and an error.
COLUMNS = ["path", "prompt", "answer", "prompt_tokens", "image_tokens", "generation_tokens", "seconds", "error"]
FORMATS = ("jsonl", "csv")
# How the progress bar and the closing line count the images without an answer.
FAILURES = {"unreadable": "could not be read", "incomplete": "ended before their JSON was complete"}


def answer_columns(schema: Optional[dict]) -> List[str]:
    """The CSV columns of the answer: ``answer``, or with a JSON Schema its top-level properties, in order.
    ``ValueError`` for a schema whose answers have no properties, or properties named like another column."""
    if schema is None:
        return ["answer"]
    properties = schema.get("properties") if schema.get("type") == "object" else None
    if not isinstance(properties, dict) or not properties:
        raise ValueError("--format csv needs a --json-schema of an object with properties (a column each)")
    taken = [name for name in properties if name in COLUMNS and name != "answer"]
    if taken:
        raise ValueError(
            f"--format csv: the schema's properties {', '.join(taken)} have the names of the CSV's own columns; "
            "use --format jsonl"
        )
    return list(properties)


def find_images(sources: Sequence[str]) -> Dict[Path, Optional[str]]:
    """The images named by ``sources`` (files, folders searched recursively, glob patterns, ``**`` included),
    each source's sorted, without repeats, each with why it cannot be read (``None`` for those to answer): a
    folder that could not be searched, a broken link, no permission to read, not a regular file. Hidden files and
    folders are left out of searches."""
    found: Dict[Path, Optional[str]] = {}
    for source in sources:
        path = Path(source).expanduser()
        if os.path.lexists(path) and not path.is_dir():
            named = {path: None}  # a file named outright is read whatever its name
        elif path.is_dir():
            named = {entry: error for entry, error in _search(path).items() if error or _is_image(entry)}
        else:
            matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
            if not matches:
                raise EVEError(f"No such file or folder, and nothing matches the pattern: {source}")
            named = dict.fromkeys(entry for entry in matches if _is_image(entry))
        for entry in sorted(named):
            if entry not in found:
                found[entry] = named[entry] or _unreadable(entry)
    if not found:
        raise EVEError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {' '.join(sources)}.")
    return found


def _search(folder: Path) -> Dict[Path, Optional[str]]:
    """The files under ``folder`` but hidden ones, and the folders that could not be searched with the error."""
    entries: Dict[Path, Optional[str]] = {}

    def unsearchable(error: OSError) -> None:
        entries[Path(error.filename)] = f"Could not search folder {error.filename}: {_reason(error)}."

    for parent, folders, files in os.walk(folder, onerror=unsearchable):
        folders[:] = [name for name in folders if not name.startswith(".")]
        entries.update(dict.fromkeys(Path(parent, name) for name in files if not name.startswith(".")))
    return entries


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir()


def _unreadable(path: Path) -> Optional[str]:
    """Why the file ``path`` cannot be read, or ``None``. Checked here because the decoder would call a file it
    cannot open corrupt; only a regular file is opened (a FIFO would block)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return f"Could not read image {path}: not a regular file."
        open(path, "rb").close()
    except FileNotFoundError as e:
        if path.is_symlink():
            return f"Could not read image {path}: a broken symbolic link (to {os.readlink(path)})."
        return f"Could not read image {path}: {_reason(e)}."
    except OSError as e:
        return f"Could not read image {path}: {_reason(e)}."
    return None


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


class Output:
    """The answers file: the paths it already holds, and one complete, flushed line per ``write``. In a CSV
    the answer takes ``answers`` columns (``answer_columns``)."""

    def __init__(self, path: Path, format: str, overwrite: bool, answers: Sequence[str] = ("answer",)):
        self.path, self.format, self.answers = path, format, list(answers)
        at = COLUMNS.index("answer")
        self.columns = COLUMNS[:at] + self.answers + COLUMNS[at + 1 :]
        if not path.parent.is_dir():
            raise EVEError(f"No such folder for --output: {path.parent}")
        self.done = set() if overwrite or not path.exists() else self._read_done()
        # A file name need not be UTF-8: its bytes that are not (surrogates in ``str(path)``) are kept losslessly.
        # In JSONL as \udcXX escapes, which leave the file UTF-8 and read back as the same string; a CSV has no
        # escapes, so there they are the name's own bytes (the file then matches the folder, though not all UTF-8).
        unencodable = "surrogateescape" if format == "csv" else "backslashreplace"
        self._file = open(path, "w" if overwrite else "a", encoding="utf-8", errors=unencodable, newline="")
        self._csv = csv.DictWriter(self._file, self.columns, lineterminator="\n") if format == "csv" else None
        if self._csv and self._file.tell() == 0:
            self._csv.writeheader()
            self._file.flush()

    def _read_done(self) -> set:
        """The paths of the complete lines. An incomplete last line (a run killed mid-write) is cut off, once
        the file's beginning shows that this command wrote it."""
        raw = self.path.read_bytes()
        end = _complete_end(raw, self.format)
        beginning = (_csv_line(self.columns) if self.format == "csv" else '{"path": ').encode()
        head = raw[:end] or raw  # the complete lines, or the start of the first one
        if not (head.startswith(beginning) or beginning.startswith(head)):
            raise EVEError(
                f"{self.path} was not written by this command, or with other columns; use --overwrite or another "
                "--output."
            )
        text = raw[:end].decode("utf-8", errors="surrogateescape")
        if self.format == "csv":
            done = {row["path"] for row in csv.DictReader(io.StringIO(text, newline=""))}
        else:
            done = set()
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    done.add(json.loads(line)["path"])
                except (json.JSONDecodeError, TypeError, KeyError):
                    raise EVEError(f"{self.path}:{number} is not a line this command wrote.") from None
        if end < len(raw):
            print(f"[WARNING] Dropping an incomplete last line of {self.path}.", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(end)
        return done

    def write(self, row: dict) -> None:
        if self._csv:
            self._csv.writerow(row if self.answers == ["answer"] else self._spread(row))
        else:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _spread(self, row: dict) -> dict:
        """``row`` with its JSON answer in its properties' columns: strings as they are, other values as JSON."""
        cells = {name: value for name, value in row.items() if name != "answer"}
        for name, value in row.get("answer", {}).items():
            if name in self.answers:
                cells[name] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return cells


def _csv_line(values: Sequence[str]) -> str:
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow(values)
    return line.getvalue()


def _complete_end(raw: bytes, format: str) -> int:
    """Where the last complete line of ``raw`` ends. In a CSV a line ends at a newline outside quotes (an
    answer may hold newlines); JSON escapes every newline in its strings."""
    if format == "jsonl":
        return raw.rfind(b"\n") + 1
    end, quoted = 0, False
    for i, byte in enumerate(raw):
        if byte == ord('"'):
            quoted = not quoted
        elif byte == ord("\n") and not quoted:
            end = i + 1
    return end


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Ask an EVE model the same question about many images; one line per image.")
    add = p.add_argument
    add_model_options(p)
    add("--images", nargs="+", required=True, help="Image files, folders (searched recursively) or glob patterns.")
    add("--prompt", "-p", default=None, help="The question ('-' reads stdin; default: 'Describe the image.').")
    add("--system-prompt", default=None, help="Replace the template's system prompt.")
    add("--output", "-o", type=Path, required=True, help="The answers file (JSONL, or CSV with --format csv).")
    add("--format", choices=FORMATS, default=None, help="Output format (default: csv for a .csv --output, else jsonl).")
    add("--overwrite", action="store_true", help="Start again instead of skipping images already in --output.")
    add("--batch-size", type=COUNT, default=8, help="Images answered together (default %(default)s).")
    add("--max-tokens", "-m", type=COUNT, default=256, help="Maximum answer length (default %(default)s).")
    add(
        "--json-schema",
        type=json_schema_file,
        default=None,
        metavar="FILE",
        help="A JSON Schema file: each answer is JSON that follows it (in a CSV, a column per top-level property).",
    )
    add("--temp", "--temperature", dest="temp", type=NON_NEGATIVE, default=0.0, help="Sampling temperature.")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format is None:
        args.format = "csv" if args.output.suffix.lower() == ".csv" else "jsonl"
    try:
        args.answer_columns = answer_columns(args.json_schema) if args.format == "csv" else ["answer"]
    except ValueError as e:
        parser.error(str(e))
    return run_cli(lambda: run(args), f"interrupted: every answer so far is in {args.output}; run again to go on")


def run(args: argparse.Namespace) -> None:
    prompt = read_prompt(args.prompt, with_images=True)
    images = find_images(args.images)
    output = Output(args.output, args.format, args.overwrite, args.answer_columns)
    try:
        todo = {path: error for path, error in images.items() if str(path) not in output.done}
        if not todo:
            print(f"All {len(images)} images are already in {args.output} (--overwrite to start again).")
            return
        if len(todo) < len(images):
            print(f"{len(images) - len(todo)} of {len(images)} images are already in {args.output}.")
        caption(args, prompt, todo, output, len(images))
    finally:
        output.close()


def caption(
    args: argparse.Namespace, prompt: str, images: Dict[Path, Optional[str]], output: Output, total: int
) -> None:
    """Answer ``prompt`` about each of ``images`` into ``output``, counting the images that fail: those with
    an error (why they cannot be read, see ``find_images``) get an error line without going to the model."""
    # The library (and mlx-lm with it) once the arguments are good: see the package's docstring.
    from ..answering import Request, answer_in_order
    from ..loading import load
    from ..request import SamplingParams
    from ..structured import check_grammar, json_schema_grammar
    from .progress import advance, progress_bar

    model, processor = load(args.model, adapter_path=args.adapter_path, max_size=args.max_size)
    grammar = None
    if args.json_schema is not None:
        grammar = json_schema_grammar(args.json_schema)
        check_grammar(grammar, processor.tokenizer)  # once here, rather than an error line for every image
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temp, grammar=grammar)
    requests = (Request(prompt, [path], args.system_prompt) for path, error in images.items() if error is None)
    answers = answer_in_order(model, processor, requests, params, batch_size=args.batch_size)
    failed, tic = Counter(), time.perf_counter()
    # closing: whatever stops the loop, the engine's thread is stopped too (left running, it aborts the exit).
    with closing(answers), progress_bar(total, total - len(images), "image") as bar:
        for path, error in images.items():
            answer = next(answers) if error is None else ImageError(error)
            if isinstance(answer, EVEError):
                failed["unreadable"] += 1
                output.write({"path": str(path), "error": str(answer)})
            else:
                row = _answer_row(path, prompt, answer, grammar is not None, args.max_tokens)
                if "error" in row:
                    failed["incomplete"] += 1
                output.write(row)
            advance(bar, ", ".join(f"{count} {kind}" for kind, count in failed.items()))
    print(
        f"Done in {time.perf_counter() - tic:.1f} s: {len(images) - sum(failed.values())} answered"
        + "".join(f", {count} {FAILURES[kind]}" for kind, count in failed.items())
        + (" (error lines)" if failed else "")
        + f"; all in {args.output}."
    )


def _answer_row(path: Path, prompt: str, answer, structured: bool, max_tokens: int) -> dict:
    """The line of an answered image. A ``structured`` answer is parsed; one whose JSON is incomplete (cut by
    ``max_tokens``) has an error instead."""
    usage = answer.usage
    row = {
        "path": str(path),
        "prompt": prompt,
        "answer": answer.text.strip(),
        "prompt_tokens": usage.prompt_tokens,
        "image_tokens": usage.image_tokens,
        "generation_tokens": usage.completion_tokens,
        "seconds": round(answer.seconds, 3),
    }
    if structured:
        try:
            row["answer"] = json.loads(answer.text)
        except ValueError:
            del row["answer"]
            row["error"] = (
                f"The answer ended after {usage.completion_tokens} tokens (--max-tokens {max_tokens}) before its "
                f"JSON was complete: {shorten(answer.text)}"
            )
    return row
