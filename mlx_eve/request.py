"""A request to the ``Engine``: its sampling settings, and what the engine keeps of it while it runs.

The first three fields of ``Request`` are what every rank of a group needs to run it alike (what
``broadcast.py`` sends); the rest is each rank's own record of its answer.
"""

import queue
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .processor import ModelInputs
from .structured import GrammarProcessor


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

    def sampler(self):
        return make_sampler(self.temperature, self.top_p, self.min_p, top_k=self.top_k)

    def logits_processors(self, tokenizer: TokenizerWrapper) -> List[Any]:
        """mlx-lm's logits processors for these settings: bias and penalties, then the grammar's mask."""
        processors = make_logits_processors(
            logit_bias=dict(self.logit_bias) or None,
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )
        if self.grammar is not None:
            processors.append(GrammarProcessor(self.grammar, tokenizer))
        return processors


@dataclass
class Request:
    inputs: ModelInputs
    params: SamplingParams
    key: List[Any]  # the prompt's tokens for the prompt cache, image tokens standing for their image's hash
    events: "queue.Queue" = field(default_factory=queue.Queue)
    uid: Optional[int] = None
    cancelled: bool = False
    cached_tokens: int = 0
    prompt_seconds: float = 0.0
    started: float = 0.0
    generated: List[int] = field(default_factory=list)
    text: str = ""  # the answer so far
    sent: int = 0  # characters of ``text`` already handed out
    detokenizer: Any = None
