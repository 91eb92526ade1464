"""A request to the ``Engine``: its sampling settings, and what the engine keeps of it while it runs.

The first three fields of ``Request`` are what every rank of a group needs to run it alike (what
``broadcast.py`` sends); the rest is each rank's own record of its answer.
"""

import queue
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from .processor import ModelInputs


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    stop: Sequence[str] = ()  # strings that end the answer (not included in it)
    top_logprobs: Optional[int] = None  # None: no log-probabilities; n: the chosen token's and the n best
    seed: Optional[int] = None  # reseeds the engine's (shared) random state when the request starts


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
