"""Many questions through the batching ``Engine``, answered in the order they were asked, with a progress bar:
what ``mlx_eve.caption`` and ``mlx_eve.evaluate`` share."""

import sys
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence, Union

from tqdm import tqdm

from .engine import Engine, SamplingParams, Stream, Usage
from .errors import EVEError
from .image import ImageInput
from .models.base import EVEModel
from .processor import Processor
from .prompts import Prompt


class Request(NamedTuple):
    prompt: Prompt
    images: Sequence[ImageInput]
    system_prompt: Optional[str] = None


@dataclass
class Answer:
    text: str
    usage: Usage

    @property
    def seconds(self) -> float:
        """From the start of the prefill to the last token (while the rest of the batch runs too)."""
        return self.usage.prompt_seconds + self.usage.generation_seconds


def answer_in_order(
    model: EVEModel,
    processor: Processor,
    requests: Iterable[Request],
    params: SamplingParams,
    *,
    batch_size: int = 8,
) -> Iterator[Union[Answer, EVEError]]:
    """Each request's answer, in the order of ``requests``, or the ``EVEError`` that refused it (an image that
    cannot be read, a prompt longer than the context). ``batch_size`` requests decode together; as many more
    are read and prepared ahead, so that the batch stays full while the oldest one finishes."""
    engine = Engine(model, processor, max_batch_size=batch_size, max_queued=2 * batch_size, prompt_cache_bytes=0)
    waiting: "deque[Union[Stream, EVEError]]" = deque()
    requests = iter(requests)
    try:
        while True:
            for request in requests:
                try:
                    waiting.append(
                        engine.submit(request.prompt, request.images, params, system_prompt=request.system_prompt)
                    )
                except EVEError as error:
                    waiting.append(error)
                if len(waiting) == 2 * batch_size:
                    break
            if not waiting:
                return
            head = waiting.popleft()
            yield head if isinstance(head, EVEError) else _collect(head)
    finally:
        engine.close()


def _collect(stream: Stream) -> Answer:
    events = list(stream)
    return Answer("".join(event.text for event in events), events[-1].usage)


def progress_bar(total: int, done: int, unit: str) -> tqdm:
    """A bar on stderr for ``total`` items, ``done`` of them before this run; see ``advance``."""
    return tqdm(
        total=total,
        initial=done,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    )


def advance(bar: tqdm, note: str = "") -> None:
    """One more item done: the bar shows the items per minute of this run, then ``note``."""
    elapsed = bar.format_dict["elapsed"]
    rate = f"{(bar.n + 1 - bar.initial) * 60 / elapsed:.1f} {bar.unit}s/min" if elapsed > 0 else ""
    bar.set_postfix_str(", ".join(part for part in (rate, note) if part), refresh=False)
    bar.update()
