"""Serving many requests at once: continuous batching with mlx-lm's ``BatchGenerator``, and a prompt cache.

Each request is prefilled on its own (its images go through the patch embedding, as ``input_embeddings``)
into its own KV cache, which then joins the running decode batch (``BatchGenerator.insert(..., caches=)``):
EVE's decode steps are text only, so every family decodes batched exactly like its mlx-lm text model. When a
request ends, its KV cache goes to an LRU prompt cache (mlx-lm's ``LRUPromptCache``, bounded in bytes) keyed
by its tokens, with each image's tokens standing for a hash of its pixels: a chat client that resends the
conversation reuses the cache instead of reading the image again.

All MLX work happens on the engine's own thread; ``submit`` may be called from any thread.

Under tensor parallelism (``mlx.launch``, the model sharded over a group) every rank must make the same model
calls, since every layer sums over the group. Only rank 0 takes requests: each round it decides a ``Plan`` (the
requests that join the batch, those cancelled, or the end) and sends it to the others, which run the same round
from it: the same prefills, prompt cache, batch and sampling, so the same tokens, with nobody to hand them to.
"""

import hashlib
import json
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .errors import EVEError
from .image import ImageInput
from .models import IMAGE_TOKEN_ID
from .models.base import EVEModel
from .processor import ModelInputs, Processor, Prompt


class QueueFullError(EVEError, RuntimeError):
    """The engine already holds as many requests as it was allowed to queue."""


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
class Usage:
    prompt_tokens: int  # the whole prompt, image tokens included
    image_tokens: int
    cached_tokens: int  # prompt tokens whose KV cache came from the prompt cache
    completion_tokens: int
    prompt_seconds: float  # prefill of the tokens that were not cached
    generation_seconds: float


@dataclass
class Event:
    """A piece of a streamed answer: one generated token and the text it completes (possibly "")."""

    text: str
    token: int
    logprob: Optional[float] = None
    top_logprobs: List[Tuple[str, float]] = field(default_factory=list)  # (token text, log-probability)
    finish_reason: Optional[str] = None  # "stop" or "length" on the last event
    usage: Optional[Usage] = None  # on the last event


class Stream:
    """The events of one request, in order, for the thread that submitted it. Iterating blocks until the next
    event; ``cancel`` (e.g. when the client went away) frees the request's place in the batch at once."""

    def __init__(self, engine: "Engine", request: "_Request"):
        self._engine, self._request = engine, request

    def __iter__(self) -> Iterator[Event]:
        while True:
            item = self._request.events.get()
            if item is _CANCELLED:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Stop the request; iterating the stream ends (after the events already delivered)."""
        self._engine._cancel(self._request)


_CANCELLED = object()


@dataclass
class _Request:
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


@dataclass
class Plan:
    """One round of the engine, as rank 0 decides it and every rank runs it."""

    admitted: List[_Request] = field(default_factory=list)  # requests that join the batch, in this order
    cancelled: List[int] = field(default_factory=list)  # uids of running requests to drop
    close: bool = False  # the engine stops


# The prompt cache keys entries by model; this engine serves one.
_MODEL = "model"
# With several ranks, how long an idle round lasts: rank 0 sends a plan at least this often, and the others sleep
# between idle rounds rather than wait inside ``all_sum``, which keeps a core busy while it waits.
_IDLE_ROUND_S = 0.05


class Engine:
    """Continuous batching for one model: ``submit`` requests from any thread, read their ``Stream``s.

    ``max_batch_size`` requests decode together; up to ``max_queued`` more wait (``QueueFullError`` beyond).
    Finished requests leave their KV cache in a prompt cache of at most ``prompt_cache_bytes``.

    ``group``: the group ``model`` is sharded over. Every rank makes an engine with the same settings (their KV
    caches are the same size, so their prompt caches keep and evict alike); rank 0's takes the requests and its
    ``close`` stops them all, the others run its rounds until then (``join``).
    """

    def __init__(
        self,
        model: EVEModel,
        processor: Processor,
        *,
        max_batch_size: int = 8,
        max_queued: int = 64,
        prompt_cache_bytes: int = 1 << 30,
        prefill_step_size: int = 2048,
        group: Optional[mx.distributed.Group] = None,
    ):
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queued = max_batch_size, max_queued
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = LRUPromptCache(max_size=1 << 20, max_bytes=prompt_cache_bytes)
        self.group = group if group is not None and group.size() > 1 else None
        self.leader = self.group is None or self.group.rank() == 0
        self._inbox: "queue.Queue[Optional[_Request]]" = queue.Queue()
        self._cancelled: "queue.Queue[_Request]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet in the batch
        self._closed = False
        self._failure: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="mlx-eve-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt: Prompt,
        images: Union[None, ImageInput, Sequence[ImageInput]] = None,
        params: Optional[SamplingParams] = None,
        *,
        system_prompt: Optional[str] = None,
        max_size: Optional[int] = None,
    ) -> Stream:
        """Queue a request. The prompt and images are checked here, in the caller's thread: ``PromptError``,
        ``ImageError`` or ``PromptTooLongError`` for a bad request, ``QueueFullError`` when the queue is full."""
        if not self.leader:
            raise EVEError("Only rank 0 of the group takes requests.")
        params = params or SamplingParams()
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {params.max_tokens}.")
        inputs = self.processor(prompt, images, system_prompt, max_size)
        room = self.processor.context_length - inputs.input_ids.size  # at least 1: the processor checked
        params = replace(params, max_tokens=min(params.max_tokens, room))
        request = _Request(inputs, params, _cache_key(inputs))
        with self._lock:
            if self._closed:
                raise EVEError("The engine is shut down.")
            if self._waiting >= self.max_queued:
                raise QueueFullError(f"{self._waiting} requests are already waiting; try again later.")
            self._waiting += 1
        self._inbox.put(request)
        return Stream(self, request)

    def close(self) -> None:
        """Stop the engine thread (on every rank); requests still running end with an error."""
        with self._lock:
            self._closed = True
        self._inbox.put(None)
        self._thread.join()

    def join(self) -> None:
        """Wait until the engine thread ends (on ranks other than 0: until rank 0's engine closes); ``EVEError``
        if it ended on an error (e.g. rank 0 went away)."""
        self._thread.join()
        if self._failure is not None:
            raise EVEError(f"The engine stopped on an error: {self._failure!r}") from self._failure

    def _cancel(self, request: _Request) -> None:
        request.cancelled = True
        request.events.put(_CANCELLED)
        self._cancelled.put(request)

    # Everything below runs on the engine thread.

    def _run(self) -> None:
        stream = mx.new_stream(mx.default_device())
        tokenizer = self.processor.tokenizer
        generator = BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=1,
            prefill_step_size=self.prefill_step_size,
            stream=stream,
        )
        running: Dict[int, _Request] = {}
        try:
            with mx.stream(stream):
                if self.group is not None:
                    # Sampling draws the same numbers on every rank from rank 0's seed (a request's is in its plan);
                    # MLX's random state is per thread: this one's, which samples.
                    seed = mx.random.randint(0, 2**31 - 1, ()) if self.leader else mx.array(0)
                    mx.random.seed(mx.distributed.all_sum(seed, group=self.group, stream=mx.cpu).item())
                while self._serve(generator, running):
                    pass
        except BaseException as error:
            self._failure = error
            raise
        finally:
            unfinished = list(running.values())
            while not self._inbox.empty():
                unfinished.append(self._inbox.get())
            for request in unfinished:
                if request is not None:
                    request.events.put(EVEError("The engine was shut down before the answer was complete."))
            generator.close()
            mx.clear_streams()

    def _serve(self, generator: BatchGenerator, running: Dict[int, "_Request"]) -> bool:
        """One round, the same on every rank: the plan (rank 0 decides it, and sends it to the others), its
        requests join the batch and its cancelled ones leave, then one decode step. False once closed."""
        plan = self._decide(running) if self.leader else None
        if self.group is not None:
            plan = self._broadcast(plan)
        if plan.close:
            return False
        for request in plan.admitted:
            self._admit(request, generator, running)
        for uid in plan.cancelled:
            if running.pop(uid, None) is not None:
                generator.remove([uid])
        if running:
            try:
                responses = generator.next_generated()
            except Exception as error:  # a failed step fails every request in it, not the engine
                for request in running.values():
                    request.events.put(error)
                generator.remove(list(running))
                running.clear()
                return True
            for response in responses:
                if response.uid in running:
                    self._deliver(response, generator, running)
        elif not self.leader:
            time.sleep(_IDLE_ROUND_S)  # rank 0 waits as long for a request before it sends the next plan
        return True

    def _decide(self, running: Dict[int, _Request]) -> Plan:
        """Rank 0's plan: waiting requests join while there is room (waiting for one when none runs), and the
        running requests cancelled since the last round leave."""
        if self._closed:
            return Plan(close=True)
        admitted: List[_Request] = []
        idle = _IDLE_ROUND_S if self.group is not None else None
        while len(running) + len(admitted) < self.max_batch_size:
            try:
                request = self._inbox.get(block=not running and not admitted, timeout=idle)
            except queue.Empty:
                break
            if request is None:
                for request in admitted:  # back in the inbox, whose requests all end with an error when closing
                    self._inbox.put(request)
                return Plan(close=True)
            with self._lock:
                self._waiting -= 1
            if not request.cancelled:
                admitted.append(request)
        cancelled = []
        while not self._cancelled.empty():
            request = self._cancelled.get()
            if request.uid is not None:
                cancelled.append(request.uid)
        # A request cancelled from now on has its uid by the next round; one cancelled until now never starts.
        return Plan([r for r in admitted if not r.cancelled], cancelled)

    def _broadcast(self, plan: Optional[Plan]) -> Plan:
        """Rank 0's ``plan`` on every rank (``None`` on the others): its length, then its bytes, each summed
        with zeros from the other ranks. An empty plan, most rounds' (each costs a step the latency of these
        sums), is its length alone: 0."""
        data = encode_plan(plan) if plan is not None and plan != Plan() else b""
        size = mx.distributed.all_sum(len(data), group=self.group, stream=mx.cpu).item()
        if size == 0:
            return Plan()
        buffer = np.frombuffer(data, np.uint8) if plan is not None else np.zeros(size, np.uint8)
        received = np.asarray(mx.distributed.all_sum(mx.array(buffer), group=self.group, stream=mx.cpu))
        return plan if plan is not None else decode_plan(received.tobytes())

    def _admit(self, request: _Request, generator: BatchGenerator, running: Dict[int, _Request]) -> None:
        try:
            cache = self._prefill(request)
        except Exception as error:
            # Every rank fails alike: the request was checked on submit, so what is left to fail is the same
            # computation on the same inputs. Only a failure of one rank alone (out of memory) breaks the step.
            request.events.put(error)
            return
        params, ids = request.params, request.inputs.input_ids.tolist()
        if params.seed is not None:
            mx.random.seed(params.seed)
        text_ids = [t for t in ids[:-1] if t != IMAGE_TOKEN_ID]  # penalties see the text, as in generate.py
        (request.uid,) = generator.insert(
            [[ids[-1]]],
            max_tokens=[params.max_tokens],
            caches=[cache],
            all_tokens=[text_ids],
            samplers=[make_sampler(params.temperature, params.top_p, params.min_p, top_k=params.top_k)],
            logits_processors=[
                make_logits_processors(
                    repetition_penalty=params.repetition_penalty,
                    repetition_context_size=params.repetition_context_size,
                )
            ],
        )
        request.detokenizer = self.processor.tokenizer.detokenizer
        request.started = time.perf_counter()
        running[request.uid] = request

    def _prefill(self, request: _Request) -> List[Any]:
        """A KV cache holding every prompt token but the last: what the prompt cache has, plus the rest."""
        tic = time.perf_counter()
        ids = request.inputs.input_ids
        cache, rest = self.prompt_cache.fetch_nearest_cache(_MODEL, request.key)
        if cache is None:
            cache, rest = make_prompt_cache(self.model), request.key
        cached = len(request.key) - len(rest)
        if cached == ids.size:  # the whole prompt: keep the last token for the generator to feed
            cached -= 1
            if not _trim(cache, 1):
                cache, cached = make_prompt_cache(self.model), 0
        todo = ids[cached:-1]
        if todo.size:
            embeddings = None
            if (np.asarray(todo) == IMAGE_TOKEN_ID).any():
                embeddings = self.model.embed_inputs(ids, request.inputs.pixel_values)[cached:-1]
            for start in range(0, todo.size, self.prefill_step_size):
                end = start + self.prefill_step_size
                chunk = None if embeddings is None else embeddings[None, start:end]
                self.model(todo[None, start:end], cache=cache, input_embeddings=chunk)
                mx.eval([c.state for c in cache])
        request.cached_tokens = cached
        request.prompt_seconds = time.perf_counter() - tic
        return cache

    def _deliver(self, response, generator: BatchGenerator, running: Dict[int, _Request]) -> None:
        """Hand one generated token to its request: text (held back while it may begin a stop string),
        log-probabilities, and at the end the usage; the finished request's cache goes to the prompt cache."""
        request = running[response.uid]
        params, tokenizer = request.params, self.processor.tokenizer
        finish = response.finish_reason
        request.generated.append(response.token)
        if not (finish == "stop" and response.token in tokenizer.eos_token_ids):
            request.detokenizer.add_token(response.token)
        if finish is not None:
            request.detokenizer.finalize()
        request.text += request.detokenizer.last_segment
        cache = response.prompt_cache
        stop_at = _find_stop(request.text, params.stop)
        if stop_at is not None:
            request.text, finish = request.text[:stop_at], "stop"
            if response.finish_reason is None:
                cache = generator.remove([response.uid], return_prompt_caches=True)[response.uid][0]
        hold = 0 if finish is not None else _stop_prefix(request.text, params.stop)
        event = Event(request.text[request.sent : len(request.text) - hold], response.token)
        request.sent = len(request.text) - hold
        if params.top_logprobs is not None:
            event.logprob, event.top_logprobs = _logprobs(
                response.logprobs, response.token, params.top_logprobs, tokenizer
            )
        if finish is not None:
            del running[response.uid]
            event.finish_reason, event.usage = finish, self._usage(request)
            self.prompt_cache.insert_cache(_MODEL, request.key + request.generated, cache)
        request.events.put(event)

    def _usage(self, request: _Request) -> Usage:
        return Usage(
            prompt_tokens=request.inputs.input_ids.size,
            image_tokens=request.inputs.image_tokens,
            cached_tokens=request.cached_tokens,
            completion_tokens=len(request.generated),
            prompt_seconds=request.prompt_seconds,
            generation_seconds=time.perf_counter() - request.started,
        )


def _cache_key(inputs: ModelInputs) -> List[Any]:
    """The prompt's token ids, each image token replaced by a digest of its image as the model will see it
    (pixels and resized size): another picture of the same size must not reuse the cache."""
    key: List[Any] = inputs.input_ids.tolist()
    digests = []
    for image in inputs.images:
        digest = hashlib.sha256(image.tobytes())
        digest.update(repr((image.mode, image.size, inputs.image_processor.target_size(*image.size))).encode())
        digests.append(digest.hexdigest())
    position = 0
    for digest in digests:
        start = key.index(IMAGE_TOKEN_ID, position)
        end = start
        while end < len(key) and key[end] == IMAGE_TOKEN_ID:
            end += 1
        key[start:end] = [digest] * (end - start)
        position = end
    return key


def encode_plan(plan: Plan) -> bytes:
    """A plan as bytes for the other ranks: per admitted request what they need to prefill and decode it alike
    (token ids, pixels, prompt-cache key, sampling settings), not what rank 0 alone uses (images, prompt text)."""
    arrays: List[np.ndarray] = []

    def add(array: mx.array) -> int:
        arrays.append(np.asarray(array))
        return len(arrays) - 1

    admitted = [
        {
            "input_ids": add(r.inputs.input_ids),
            "pixel_values": [add(p) for p in r.inputs.pixel_values],
            "image_tokens": r.inputs.image_tokens,
            "key": r.key,
            "params": asdict(r.params),
        }
        for r in plan.admitted
    ]
    return pack({"admitted": admitted, "cancelled": plan.cancelled, "close": plan.close}, arrays)


def decode_plan(data: bytes) -> Plan:
    """The plan ``encode_plan`` wrote, on a rank without the images: their pixels came with it."""
    header, arrays = unpack(data)
    admitted = []
    for entry in header["admitted"]:
        inputs = ModelInputs(mx.array(arrays[entry["input_ids"]]), [], None, entry["image_tokens"], "")
        inputs.pixel_values = [mx.array(arrays[i]) for i in entry["pixel_values"]]  # the property's value
        admitted.append(_Request(inputs, SamplingParams(**entry["params"]), entry["key"]))
    return Plan(admitted, header["cancelled"], header["close"])


def pack(header: Dict[str, Any], arrays: Sequence[np.ndarray]) -> bytes:
    """A JSON ``header`` and numpy ``arrays`` as bytes: the header's length (8 bytes), the JSON (with the arrays'
    dtypes and shapes), the arrays' raw bytes (in C order). No pickle: unpickling can run any code."""
    arrays = [np.asarray(a) for a in arrays]
    if any(a.dtype.hasobject for a in arrays):
        raise TypeError("Only arrays of numbers can be packed.")
    meta = json.dumps({"header": header, "arrays": [[a.dtype.str, a.shape] for a in arrays]}).encode()
    return b"".join([len(meta).to_bytes(8, "little"), meta, *(a.tobytes() for a in arrays)])


def unpack(data: bytes) -> Tuple[Dict[str, Any], List[np.ndarray]]:
    """``pack``'s header and arrays (read-only views of ``data``)."""
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + size])
    arrays, offset = [], 8 + size
    for dtype, shape in meta["arrays"]:
        dtype, count = np.dtype(dtype), math.prod(shape)
        arrays.append(np.frombuffer(data, dtype, count, offset).reshape(shape))
        offset += dtype.itemsize * count
    return meta["header"], arrays


def _trim(cache: List[Any], n: int) -> bool:
    if not can_trim_prompt_cache(cache):
        return False
    trim_prompt_cache(cache, n)
    return True


def _find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _logprobs(logprobs: mx.array, token: int, top: int, tokenizer) -> Tuple[float, List[Tuple[str, float]]]:
    values = np.asarray(logprobs.astype(mx.float32))
    best = np.argsort(-values)[:top] if top > 0 else []
    return float(values[token]), [(tokenizer.decode([int(t)]), float(values[t])) for t in best]


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
    ``temperature`` too)."""
    if "temp" in sampling:
        sampling["temperature"] = sampling.pop("temp")
    params = SamplingParams(**sampling)
    images = list(images) if images is not None else [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries.")
    engine = Engine(model, processor, max_batch_size=max_batch_size, max_queued=len(prompts), prompt_cache_bytes=0)
    try:
        streams = [engine.submit(prompt, image, params) for prompt, image in zip(prompts, images)]
        return ["".join(event.text for event in stream) for stream in streams]
    finally:
        engine.close()
