"""Fine-tuning data: LLaVA-style or mlx-vlm-style conversations with images, checked before training.

Accepted layouts: a folder with ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl``, or a single ``.json``
(a list of records, as LLaVA ships its data) or ``.jsonl`` file used for training. Records:

- LLaVA: ``{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}]}``
- mlx-vlm: ``{"images": ["a.jpg"], "messages": [{"role": "user", "content": "Q"},
  {"role": "assistant", "content": "A"}]}``

Image paths are relative to the data file (or ``image_folder``). Every problem in every file is collected
and reported with its file and line before any training starts.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from mlx_lm.utils import common_prefix_len

from .errors import ImageError
from .image import open_image
from .processor import Processor
from .prompts import IMAGE, place_images
from .records import DataError, parse_record, raise_problems, read_records

SPLITS = ("train", "valid", "test")


@dataclass
class Sample:
    """One conversation, tokenized: ``targets[i]`` says whether token ``i`` is supervised (an answer)."""

    where: str  # "file:line", for messages
    images: List[Path]
    input_ids: np.ndarray  # int32, image placeholders expanded
    targets: np.ndarray  # bool, same length

    @property
    def num_targets(self) -> int:
        return int(self.targets.sum())


def load_splits(
    data: Path, processor: Processor, max_seq_length: int, image_folder: Optional[Path] = None
) -> Dict[str, List[Sample]]:
    """``{"train": [...], "valid": [...], "test": [...]}`` (splits that exist), or a DataError listing
    every problem found."""
    data = Path(data)
    if data.is_dir():
        files = {split: data / f"{split}.jsonl" for split in SPLITS if (data / f"{split}.jsonl").exists()}
        if not files:
            raise DataError(f"{data} holds none of {', '.join(s + '.jsonl' for s in SPLITS)}.")
    elif data.is_file():
        files = {"train": data}
    else:
        raise DataError(f"Data not found: {data}")
    splits, problems, outside = {}, [], []
    for split, file in files.items():
        folder = image_folder or file.parent
        splits[split] = _load_file(file, processor, max_seq_length, folder, problems)
        outside += [
            (s.where, p) for s in splits[split] for p in s.images if not p.resolve().is_relative_to(folder.resolve())
        ]
    if outside:
        shown = ", ".join(f"{path} ({where})" for where, path in outside[:3])
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        print(
            f"[WARNING] {len(outside)} image path(s) lead outside the data folder, used as given: {shown}{more}",
            file=sys.stderr,
        )
    raise_problems(problems, "nothing was trained")
    return splits


def _load_file(
    file: Path, processor: Processor, max_seq_length: int, image_folder: Path, problems: List[str]
) -> List[Sample]:
    samples = []
    for where, record in read_records(file, problems):
        try:
            samples.append(encode_record(record, where, processor, max_seq_length, image_folder))
        except (DataError, ImageError, ValueError) as e:
            problems.append(f"{where}: {e}")
    return samples


def encode_record(record, where: str, processor: Processor, max_seq_length: int, image_folder: Path) -> Sample:
    messages, system, paths = parse_record(record, image_folder)
    for path in paths:
        if not path.is_file():
            raise DataError(f"image not found: {path}")
    sizes = [open_image(path).size for path in paths]
    counts = [processor.image_processor.num_tokens(*size) for size in sizes]
    messages = place_images(messages, len(paths))
    input_ids, targets = tokenize_conversation(processor, messages, system, counts)
    if len(input_ids) > max_seq_length:
        raise DataError(
            f"{len(input_ids)} tokens ({sum(counts)} of them image tokens) exceed --max-seq-length {max_seq_length}"
        )
    return Sample(where, paths, input_ids, targets)


def tokenize_conversation(
    processor: Processor, messages: List[Dict[str, str]], system: Optional[str], image_counts: List[int]
) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids of the whole conversation, and which of them are supervised: each answer and the token(s)
    that end it, exactly the tokens the model must produce after ``ASSISTANT:`` at inference."""

    def tokens(turns: List[Dict[str, str]]) -> List[int]:
        # Ending with the user, the template opens the answer; ending with the assistant, it closes it.
        pieces = processor.template.pieces(turns, system)
        return processor.tokenize(pieces, image_counts[: pieces.count(IMAGE)])

    full = tokens(messages)
    targets = np.zeros(len(full), dtype=bool)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = common_prefix_len(tokens(messages[:i]), full)
            end = common_prefix_len(tokens(messages[: i + 1]), full)
            targets[start:end] = True
    return np.array(full, dtype=np.int32), targets
