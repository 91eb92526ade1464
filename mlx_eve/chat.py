"""A conversation about one image that keeps the model's KV cache between turns.

Each turn renders the whole conversation with EVE's template, keeps the longest prefix of token ids the
cache already holds, and runs only the rest through the model. A follow-up question therefore processes
just the new tokens: the image is embedded and prefilled once, on the turn that first needs it.
"""

from contextlib import closing
from dataclasses import dataclass, fields
from typing import Dict, Generator, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .generation import GenerationResponse, generate_from_inputs
from .image import ImageInput, load_image
from .models.base import EVEModel
from .prefill import Prefill, reuse_prefix
from .processor import Processor


@dataclass
class ChatResponse(GenerationResponse):
    """A streamed token of a chat turn.

    ``prompt_tokens`` (and ``prompt_tps``) count only the tokens run through the model this turn, as in
    mlx-lm; ``reused_tokens`` more came from the KV cache. ``image_tokens`` is the image's share of the
    whole prompt, ``new_image_tokens`` the part of it processed this turn (0 on a follow-up).
    """

    reused_tokens: int = 0
    new_image_tokens: int = 0


class ChatSession:
    """A conversation with an EVE model about ``image`` (or about nothing: text-only).

    The image is read once, here (``ImageError`` if it cannot be). ``stream`` answers the next question;
    the question and the answer are then part of the conversation. For another image, start a new session.
    """

    def __init__(
        self,
        model: EVEModel,
        processor: Processor,
        image: Optional[ImageInput] = None,
        *,
        max_kv_size: Optional[int] = None,
    ):
        self.model = model
        self.processor = processor
        self.image = None if image is None else load_image(image)
        self.messages: List[Dict[str, str]] = []
        self.max_kv_size = max_kv_size
        self.prompt_cache = make_prompt_cache(model, max_kv_size=max_kv_size)
        # The token ids whose keys and values are in prompt_cache, and the size the image had in them.
        self.cached_ids: List[int] = []
        self._cached_image_size: Optional[Tuple[int, int]] = None

    def stream(
        self,
        question: str,
        max_tokens: int = 256,
        temp: float = 0.0,
        *,
        system_prompt: Optional[str] = None,
        max_size: Optional[int] = None,
        **kwargs,
    ) -> Generator[ChatResponse, None, None]:
        """Answer ``question`` in the context of the conversation so far, one response per token.

        ``max_size`` sets the EVEv2 image resolution for this turn (changing it re-embeds the image).
        Other keyword arguments are ``generate_from_inputs``'s (sampling, penalties, mlx-lm options).
        Closing the generator early (a stop button) keeps the partial answer as the assistant's message.
        Raises ``PromptTooLongError`` when the conversation no longer fits the model's context.
        """
        messages = self.messages + [{"role": "user", "content": question}]
        images = [] if self.image is None else [self.image]
        inputs = self.processor(messages, images, system_prompt, max_size)  # no pixel work until needed
        ids = inputs.input_ids.tolist()
        image_size = images and inputs.image_processor.target_size(*self.image.size)
        reused = self._reuse(ids, image_size)
        new_image_tokens = Prefill(inputs, reused).image_tokens
        mx.reset_peak_memory()
        generated: List[int] = []
        answer = ""
        try:
            with closing(
                generate_from_inputs(
                    self.model,
                    self.processor,
                    inputs,
                    max_tokens,
                    temp,
                    prompt_cache=self.prompt_cache,
                    reused=reused,
                    **kwargs,
                )
            ) as responses:
                for response in responses:
                    generated.append(response.token)
                    answer += response.text
                    values = {f.name: getattr(response, f.name) for f in fields(response)}
                    yield ChatResponse(**values, reused_tokens=reused, new_image_tokens=new_image_tokens)
        finally:
            # mlx-lm feeds each token back into the cache before handing it out (and may stop part-way
            # through the prompt), so the cache's length says exactly which ids it holds.
            self.cached_ids = (ids + generated)[: self.prompt_cache[0].offset]
            self._cached_image_size = image_size
            if generated:
                # mlx-lm's detokenizers drop the space the first answer token starts with; the template writes
                # it back ("ASSISTANT: " + answer), so the answer re-tokenizes as generated and stays cached.
                self.messages = messages + [{"role": "assistant", "content": answer}]

    def _reset_cache(self) -> None:
        self.prompt_cache = make_prompt_cache(self.model, max_kv_size=self.max_kv_size)
        self.cached_ids = []

    def _reuse(self, ids: List[int], image_size) -> int:
        """Cut the cache back to what ``ids`` reuse of it (nothing after another image size); how many they do."""
        same_image = image_size == self._cached_image_size
        reused = reuse_prefix(self.prompt_cache, self.cached_ids, ids) if same_image else 0
        if reused:
            self.cached_ids = self.cached_ids[:reused]
        else:
            self._reset_cache()
        return reused
