"""Scoring a model's answers against reference answers: the questions of a data file, the greedy answers
through the batching engine, the metrics and the per-category table (what ``mlx_eve.evaluate`` reports).

Reads the fine-tuning formats (LLaVA and mlx-vlm conversations: the last answer is the reference, the turns
before it the history) and the VQA layout of one question with a list of accepted answers::

    {"image": "a.jpg", "question": "How many cats?", "answers": ["two", "2"], "category": "count"}
"""

import itertools
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .answering import Request, answer_in_order
from .errors import EVEError
from .models.base import EVEModel
from .processor import Processor
from .prompts import IMAGE_PLACEHOLDER
from .records import DataError, parse_record, raise_problems, read_records, record_images
from .request import SamplingParams

ARTICLES = {"a", "an", "the"}
# A category table row for questions without one, when others have one.
UNCATEGORISED = "-"


@dataclass
class Question:
    where: str  # "file:line"
    messages: List[Dict[str, str]]  # the conversation so far, ending with the question (a user turn)
    system: Optional[str]
    images: List[Path]
    references: List[str]  # the accepted answers
    category: Optional[str] = None

    @property
    def text(self) -> str:
        return self.messages[-1]["content"].replace(IMAGE_PLACEHOLDER, "").strip()


@dataclass
class Prediction:
    question: Question
    answer: Optional[str]  # None when the question could not be asked (see error)
    correct: bool
    error: Optional[str] = None

    def to_json(self) -> dict:
        q = self.question
        line = {"where": q.where, "question": q.text, "answer": self.answer, "references": q.references}
        line.update(correct=self.correct, category=q.category)
        return line if self.error is None else {**line, "error": self.error}


def parse_question(record, where: str, image_folder: Path) -> Question:
    """The question a record asks: a conversation's last one (its answer the reference, the turns before it the
    history), or a VQA record's ``question`` with its ``answers`` (a list, or one string)."""
    if isinstance(record, dict) and "question" in record:
        question, references = record["question"], record.get("answers", record.get("answer"))
        references = [references] if isinstance(references, str) else references
        if not isinstance(question, str) or not question.strip():
            raise DataError('"question" must be a non-empty string')
        if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
            raise DataError('"answers" must be a non-empty list of strings, or one string')
        messages, system, images = [{"role": "user", "content": question}], None, record_images(record, image_folder)
    else:
        messages, system, images = parse_record(record, image_folder)
        *messages, answer = messages
        references = [answer["content"]]
    missing = [path for path in images if not path.is_file()]
    if missing:
        raise DataError(f"image not found: {missing[0]}")
    category = record.get("question_type", record.get("category"))
    if category is not None and not isinstance(category, (str, int)):
        raise DataError('"question_type" or "category" must be a string')
    return Question(where, messages, system, images, references, None if category is None else str(category))


def data_file(data: Path) -> Path:
    """``data`` itself, or a folder's ``test.jsonl`` (its ``valid.jsonl`` when it has no test split)."""
    if data.is_file():
        return data
    for split in ("test", "valid"):
        if (data / f"{split}.jsonl").is_file():
            return data / f"{split}.jsonl"
    raise DataError(f"{data} holds neither test.jsonl nor valid.jsonl.")


def read_questions(file: Path, image_folder: Optional[Path] = None, limit: Optional[int] = None) -> List[Question]:
    """The first ``limit`` (default: all) questions of a ``.jsonl`` or ``.json`` file, image paths relative to
    ``image_folder`` (default: the file's folder); a DataError lists every problem with its file and line."""
    questions, problems = [], []
    for where, record in itertools.islice(read_records(file, problems), limit):
        try:
            questions.append(parse_question(record, where, image_folder or file.parent))
        except DataError as e:
            problems.append(f"{where}: {e}")
    raise_problems(problems, "nothing was evaluated")
    if not questions:
        raise DataError(f"{file} holds no records.")
    return questions


def normalise(text: str) -> str:
    """Lower case, punctuation read as spaces, without the articles a/an/the, words separated by one space."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(word for word in text.split() if word not in ARTICLES)


def is_correct(answer: str, references: Sequence[str], metric: str = "exact") -> bool:
    """Whether the normalised answer equals (``exact``) or contains as whole words (``contains``) one of the
    normalised references."""
    answer = normalise(answer)
    if metric == "exact":
        return any(answer == normalise(r) for r in references)
    return any(f" {normalise(r)} " in f" {answer} " for r in references)


def predict(
    model: EVEModel,
    processor: Processor,
    questions: Sequence[Question],
    *,
    metric: str = "exact",
    max_tokens: int = 32,
    batch_size: int = 8,
) -> Iterator[Prediction]:
    """The greedy answer to each question, in order, scored with ``metric``; a question whose image cannot be
    read (or whose prompt is too long) is wrong, with the reason as its ``error``."""
    requests = (Request(q.messages, q.images, q.system) for q in questions)
    params = SamplingParams(max_tokens=max_tokens)
    answers = answer_in_order(model, processor, requests, params, batch_size=batch_size)
    for question, answer in zip(questions, answers):
        if isinstance(answer, EVEError):
            yield Prediction(question, None, False, str(answer))
        else:
            text = answer.text.strip()
            yield Prediction(question, text, is_correct(text, question.references, metric))


def tally(predictions: Iterable[Prediction]) -> Dict[str, Tuple[int, int]]:
    """{category: (correct, total)}, sorted by category; empty when no question has a category."""
    predictions = list(predictions)
    if all(p.question.category is None for p in predictions):
        return {}
    correct, total = Counter(), Counter()
    for p in predictions:
        category = p.question.category or UNCATEGORISED
        total[category] += 1
        correct[category] += p.correct
    return {category: (correct[category], total[category]) for category in sorted(total)}


def summary_table(predictions: Sequence[Prediction]) -> str:
    """Questions, right answers and accuracy per category (when the data has categories) and overall."""
    rows = [*tally(predictions).items(), ("overall", (sum(p.correct for p in predictions), len(predictions)))]
    width = max(len("category"), *(len(name) for name, _ in rows))
    lines = [f"{'category':<{width}}  {'questions':>9}  {'correct':>7}  {'accuracy':>8}"]
    for name, (correct, total) in rows:
        lines.append(f"{name:<{width}}  {total:>9}  {correct:>7}  {correct / total:>8.1%}")
    return "\n".join(lines)
