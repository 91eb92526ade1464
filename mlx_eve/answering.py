"""Many questions through the batching ``Engine``, answered in the order they were asked: ``answer_in_order``
(what the caption and evaluate commands share) and ``batch_generate`` on it."""

from collections import deque
from contextlib import closing
from dataclasses import dataclass
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Union

from .engine import Engine, Stream, Usage
from .errors import EVEError
from .image import ImageInput
from .models.base import EVEModel
from .processor import Processor
from .prompts import Prompt
from .request import SamplingParams
from .structured import requested_grammar


class Request(NamedTuple):
    prompt: Prompt
    images: Union[None, ImageInput, Sequence[ImageInput]]
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
            with engine.arriving():  # those read now start together
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


def batch_generate(
    model: EVEModel,
    processor: Processor,
    prompts: Sequence[Prompt],
    images: Optional[Sequence[Union[None, ImageInput, Sequence[ImageInput]]]] = None,
    *,
    max_batch_size: int = 8,
    **sampling,
) -> List[str]:
    """The answers to ``prompts`` (each a question or a message list), in order, decoded together.
    ``images[i]`` goes with ``prompts[i]``; ``sampling``: ``SamplingParams`` fields (``temp`` for
    ``temperature`` too), and ``json_schema=`` or ``response_format=`` as in ``stream_generate``. The first
    prompt refused (an image that cannot be read, a prompt longer than the context) raises its ``EVEError``."""
    if "temp" in sampling:
        sampling["temperature"] = sampling.pop("temp")
    grammar = requested_grammar(sampling.pop("response_format", None), sampling.pop("json_schema", None))
    params = SamplingParams(**sampling, grammar=grammar)
    images = list(images) if images is not None else [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries.")
    requests = [Request(prompt, image) for prompt, image in zip(prompts, images)]
    texts = []
    with closing(answer_in_order(model, processor, requests, params, batch_size=max_batch_size)) as answers:
        for answer in answers:
            if isinstance(answer, EVEError):
                raise answer
            texts.append(answer.text)
    return texts
