"""A request to the ``Engine``: its sampling settings, and what the engine keeps of it while it runs.

The first three fields of ``Request`` are what every rank of a group needs to run it alike (what
``broadcast.py`` sends); the rest is each rank's own record of its answer.
"""

import math
import numbers
import queue
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .arguments import MAX_SEED
from .errors import EVEError
from .processor import ModelInputs
from .structured import GrammarProcessor

MAX_INDEX = 2**31 - 1  # MLX slices with 32-bit integers
# Sampling divides by the temperature in float32: below this, 1/temperature times a log-probability overflows
# to -inf for every token, and the draw is uniform instead of nearly greedy.
MIN_TEMPERATURE = 1e-6
# Stop strings are looked for after every token, on the engine thread that every request shares: bounded work.
MAX_STOPS = 16
MAX_STOP_LENGTH = 256


class SamplingError(EVEError, ValueError):
    """A sampling setting the model or MLX cannot take; ``field`` names it."""

    def __init__(self, field: str, wanted: str, value: Any):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:79] + "…"
        super().__init__(f"Invalid '{field}': expected {wanted}, got {shown}.")
        self.field = field


def of_kind(value: Any, kind: type) -> bool:
    """Whether ``value`` is a ``kind`` as a setting must be: a float is any real number a float can hold (finite),
    an int an integer, and a bool neither."""
    if isinstance(value, bool) and kind is not bool:
        return False
    if kind is float:
        try:
            return isinstance(value, numbers.Real) and math.isfinite(float(value))
        except OverflowError:  # an integer beyond any float
            return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, kind)


def number_limits(vocab_size: int) -> Dict[str, Tuple[type, str, Callable[[Any], bool]]]:
    """Each number setting's kind and valid values (words for a message, and a test), for a model that answers
    with ``vocab_size`` token ids."""
    return {
        "max_tokens": (int, "an integer >= 1", lambda v: v >= 1),
        "temperature": (
            float,
            f"0 (greedy) or a number >= {MIN_TEMPERATURE:g}",
            lambda v: v == 0 or v >= MIN_TEMPERATURE,
        ),
        "top_p": (float, "a number in (0, 1]", lambda v: 0 < v <= 1),
        # mlx-lm's top-k sampler keeps fewer tokens than the vocabulary; 0 keeps them all.
        "top_k": (int, f"an integer from 0 (all) to {vocab_size - 1}", lambda v: 0 <= v < vocab_size),
        "min_p": (float, "a number in [0, 1]", lambda v: 0 <= v <= 1),
        "repetition_penalty": (float, "a number from 0.01 to 100", lambda v: 0.01 <= v <= 100),
        "repetition_context_size": (int, f"an integer from 1 to {MAX_INDEX}", lambda v: 1 <= v <= MAX_INDEX),
        "presence_penalty": (float, "a number from -2 to 2", lambda v: -2 <= v <= 2),
        "frequency_penalty": (float, "a number from -2 to 2", lambda v: -2 <= v <= 2),
        "top_logprobs": (int, f"an integer from 0 to {vocab_size}", lambda v: 0 <= v <= vocab_size),
        "seed": (int, f"an integer from 0 to {MAX_SEED}", lambda v: 0 <= v <= MAX_SEED),
    }


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Sequence[Tuple[int, float]] = ()  # (token id, added to its logit)
    stop: Sequence[str] = ()  # strings that end the answer (not included in it)
    top_logprobs: Optional[int] = None  # None: no log-probabilities; n: the chosen token's and the n best
    seed: Optional[int] = None  # reseeds the engine's (shared) random state when the request starts
    grammar: Optional[str] = None  # an llguidance grammar the answer is held to (structured.py)

    def check(self, vocab_size: int) -> None:
        """``SamplingError`` for the first setting the model (``vocab_size`` token ids) or MLX cannot take."""
        for name, (kind, wanted, ok) in number_limits(vocab_size).items():
            value = getattr(self, name)
            if value is not None and not (of_kind(value, kind) and ok(value)):
                raise SamplingError(name, wanted, value)
        for token, bias in self.logit_bias:
            if not (of_kind(token, int) and 0 <= token < vocab_size):
                raise SamplingError("logit_bias", f"token ids from 0 to {vocab_size - 1}", token)
            if not of_kind(bias, float):
                raise SamplingError("logit_bias", "finite biases", bias)
        if len(self.stop) > MAX_STOPS:
            raise SamplingError("stop", f"at most {MAX_STOPS} stop strings", len(self.stop))
        for stop in self.stop:
            if not (isinstance(stop, str) and len(stop) <= MAX_STOP_LENGTH):
                raise SamplingError("stop", f"strings of at most {MAX_STOP_LENGTH} characters", stop)

    def sampler(self):
        # As floats: MLX cannot take a Python integer beyond 64 bits, which ``check`` lets through as a number.
        return make_sampler(float(self.temperature), float(self.top_p), float(self.min_p), top_k=self.top_k)

    def logits_processors(self, tokenizer: TokenizerWrapper) -> List[Any]:
        """mlx-lm's logits processors for these settings: bias and penalties, then the grammar's mask."""
        processors = make_logits_processors(
            logit_bias={token: float(bias) for token, bias in self.logit_bias} or None,
            repetition_penalty=_float(self.repetition_penalty),
            repetition_context_size=self.repetition_context_size,
            presence_penalty=_float(self.presence_penalty),
            frequency_penalty=_float(self.frequency_penalty),
        )
        if self.grammar is not None:
            processors.append(GrammarProcessor(self.grammar, tokenizer))
        return processors


def _float(value: Optional[float]) -> Optional[float]:
    return None if value is None else float(value)


@dataclass
class Request:
    inputs: ModelInputs
    params: SamplingParams
    key: List[Any]  # the prompt's tokens for the prompt cache, image tokens standing for their image's hash
    events: "queue.Queue" = field(default_factory=queue.Queue)
    uid: Optional[int] = None
    cancelled: bool = False
    cached_tokens: int = 0
    reserved: int = 0  # the memory it may hold at its peak (``memory.py``)
    slot: Optional[int] = None  # where the generator finds its image embeddings while it is prefilled
    admitted: float = 0.0  # when it joined the generator
    prompt_seconds: float = 0.0
    started: float = 0.0  # when its first token came
    generated: List[int] = field(default_factory=list)
    text: str = ""  # the answer so far
    sent: int = 0  # characters of ``text`` already handed out
    detokenizer: Any = None
    failure: Optional[Exception] = None  # what failed in its part of a decode step (it then leaves the batch)
