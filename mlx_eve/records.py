"""Reading conversation records (LLaVA or mlx-vlm layout) from ``.jsonl`` / ``.json`` files, every problem
noted with its file and line. Light on purpose: the commands that read data parse their options first."""

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from .errors import EVEError
from .prompts import IMAGE_PLACEHOLDER

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(EVEError, ValueError):
    pass


def read_records(file: Path, problems: List[str]) -> Iterator[Tuple[str, object]]:
    """(where, record) pairs: one per non-empty line of a .jsonl, one per element of a .json list. A line that
    is not JSON is added to ``problems`` as "file:line: reason"."""
    raw = file.read_bytes()
    if file.suffix == ".json":
        try:
            records = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            problems.append(f"{file}:{line}: not UTF-8 text ({e.reason})")
            return
        except json.JSONDecodeError as e:
            problems.append(f"{file}:{e.lineno}: invalid JSON ({e.msg})")
            return
        if not isinstance(records, list):
            problems.append(f"{file}: expected a JSON list of records")
            return
        yield from ((f"{file}: record {i}", r) for i, r in enumerate(records, 1))
        return
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                yield f"{file}:{number}", json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems.append(f"{file}:{number}: not UTF-8 text ({e.reason})")
            except json.JSONDecodeError as e:
                problems.append(f"{file}:{number}: invalid JSON ({e.msg})")


def raise_problems(problems: List[str], consequence: str) -> None:
    """A DataError listing the first 50 ``problems`` (and how many more), unless there are none."""
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"{len(problems)} problem(s) in the data; {consequence}:\n{shown}{more}")


def record_images(record: dict, image_folder: Path) -> List[Path]:
    """The record's ``image`` or ``images`` (a path or a list of them), relative to ``image_folder``."""
    images = record.get("images", record.get("image")) or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DataError("image paths must be strings")
    return [image_folder / i for i in images]


def parse_record(record, image_folder: Path) -> Tuple[List[Dict[str, str]], Optional[str], List[Path]]:
    """(messages, system prompt, image paths) from a LLaVA or mlx-vlm record."""
    if not isinstance(record, dict):
        raise DataError("a record must be a JSON object")
    if "conversations" in record:
        turns = [(t.get("from"), t.get("value")) for t in record["conversations"] if isinstance(t, dict)]
    elif "messages" in record:
        turns = [(m.get("role"), _text(m.get("content"))) for m in record["messages"] if isinstance(m, dict)]
    elif "question" in record:  # the VQA layout `mlx_eve.evaluate` reads: its first answer is the one learnt
        answers = record.get("answers", record.get("answer"))
        answer = answers[0] if isinstance(answers, list) and answers else answers
        turns = [("user", record["question"]), ("assistant", answer)]
    else:
        raise DataError('no "conversations" (LLaVA), "messages" (mlx-vlm) or "question" (VQA)')
    images = record_images(record, image_folder)
    system, messages = None, []
    for role, content in turns:
        if ROLES.get(role) is None or not isinstance(content, str):
            raise DataError(
                f"a turn has role {role!r} and content {type(content).__name__}; expected text turns of {sorted(ROLES)}"
            )
        if ROLES[role] == "system":
            system = content
        else:
            messages.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn: nothing to learn from")
    if messages[-1]["role"] != "assistant":
        raise DataError("the conversation ends with an unanswered user turn")
    return messages, system, images


def _text(content) -> Optional[str]:
    """mlx-vlm content: a string, or parts like [{"type": "image"}, {"type": "text", "text": "Q"}]."""
    if isinstance(content, list):
        parts = [
            IMAGE_PLACEHOLDER + "\n" if p.get("type") == "image" else p.get("text", "")
            for p in content
            if isinstance(p, dict)
        ]
        return "".join(parts)
    return content
