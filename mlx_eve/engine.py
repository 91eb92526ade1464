"""Serving many requests at once: continuous batching with mlx-lm's ``BatchGenerator``, and a prompt cache.

The requests that join together are prefilled together by the generator, in chunks between decode steps, their
images' embeddings given to it as virtual token ids (``batching.py``); EVE's decode steps are text only, so every
family decodes batched exactly like its mlx-lm text model. What a prompt cache holds of a prompt is not prefilled
again (``BatchGenerator.insert(..., caches=)``). When a
request ends, its KV cache goes to an LRU prompt cache (mlx-lm's ``LRUPromptCache``, bounded in bytes) keyed
by its tokens, with each image's tokens standing for a hash of its pixels: a chat client that resends the
conversation reuses the cache instead of reading the image again.

All MLX work happens on the engine's own thread; ``submit`` may be called from any thread.

One request cannot harm another: its settings are checked on submit (``SamplingParams.check``), a failure of its
own part of a decode step (its sampler, its logits processors, the delivery of its token) fails it alone, and a
cancelled request leaves at the next round whatever stage it is at. Should the engine thread stop on an error
anyway, every waiting and later request fails at once with ``EngineStoppedError`` (``failure`` says why).

Under tensor parallelism (``mlx.launch``, the model sharded over a group) every rank must make the same model
calls, since every layer sums over the group. Only rank 0 takes requests: each round it decides a ``Plan`` (the
requests that join the batch, those cancelled, or the end) and sends it to the others (``broadcast.py``), which
run the same round from it: the same prefills, prompt cache, batch and sampling, so the same tokens, with nobody
to hand them to.
"""

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache

from .batching import EVEBatchGenerator, ImageEmbeddings, text_ids
from .broadcast import Plan, broadcast_plan
from .disk_cache import DiskPromptCache
from .errors import EVEError
from .image import ImageInput
from .memory import MemoryBudget, default_limit, describe
from .models import IMAGE_TOKEN_ID
from .models.base import EVEModel, image_spans
from .prefill import reuse_prefix
from .processor import ModelInputs, Processor, Prompt
from .request import Request, SamplingParams
from .structured import GrammarError, check_grammar

logger = logging.getLogger(__name__)


class QueueFullError(EVEError, RuntimeError):
    """The engine already holds as many requests as it was allowed to queue."""


class RequestTooLargeError(EVEError, ValueError):
    """A request that would need more memory than the engine may ever give one."""


class EngineStoppedError(EVEError, RuntimeError):
    """The engine no longer takes requests: it was closed, or its thread stopped on an error."""


class RequestFailedError(EVEError, RuntimeError):
    """The engine could not finish this request: computing its next token failed (its log has the details)."""


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
    stop: Optional[str] = None  # on the last event, the stop string that ended the answer, if one did
    usage: Optional[Usage] = None  # on the last event


class Stream:
    """The events of one request, in order, for the thread that submitted it. Iterating blocks until the next
    event; ``cancel`` (e.g. when the client went away) frees the request's place in the batch at once."""

    def __init__(self, engine: "Engine", request: Request):
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

    @property
    def engine_failure(self) -> Optional[BaseException]:
        """What stopped the engine that answers this stream, if an error did."""
        return self._engine.failure

    def cancel(self) -> None:
        """Stop the request; iterating the stream ends (after the events already delivered)."""
        self._engine._cancel(self._request)


_CANCELLED = object()


# The prompt cache keys entries by model; this engine serves one.
_MODEL = "model"
# With several ranks, how long an idle round lasts: rank 0 sends a plan at least this often, and the others sleep
# between idle rounds rather than wait inside ``all_sum``, which keeps a core busy while it waits.
_IDLE_ROUND_S = 0.05
# An idle engine that receives a request waits at most this long for others that arrive with it: while requests are
# on their way (``Arrival``), and till _ARRIVALS_S after the last one was noted (clients of a burst connect a few
# milliseconds apart).
_GATHER_S = 0.1
_ARRIVALS_S = 0.01


class Arrival:
    """A request on its way to ``Engine.submit`` (a server reading it, or ``submit`` checking it): while one is
    open, and shortly after one began, an idle engine that has just taken a request waits for more (at most
    ``_GATHER_S``), so that requests that arrive together are prefilled together. ``end`` (or leaving its ``with``)
    once it is submitted or refused."""

    def __init__(self, engine: "Engine"):
        self._engine, self._open = engine, True
        with engine._lock:
            engine._arriving += 1
            engine._last_arrival = time.monotonic()

    def end(self) -> None:
        engine = self._engine
        with engine._arrived:
            if self._open:
                self._open = False
                engine._arriving -= 1
                engine._arrived.notify_all()

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *exc) -> None:
        self.end()


class Engine:
    """Continuous batching for one model: ``submit`` requests from any thread, read their ``Stream``s.

    ``max_batch_size`` requests decode together; up to ``max_queued`` more wait (``QueueFullError`` beyond).
    A request joins the batch only when the memory it may hold (``memory.py``) fits, with what the others hold,
    within ``max_memory`` (default: ``memory.DEFAULT_SHARE`` of the machine's) beside the model and the prompt
    cache; it waits until then, and one that could never fit is refused (``RequestTooLargeError``).
    Finished requests leave their KV cache in a prompt cache of at most ``prompt_cache_bytes``; with a
    ``disk_cache``, the KV cache of each image prompt up to its last image is also kept there, for the next
    question about the same images, after a restart too.

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
        disk_cache: Optional[DiskPromptCache] = None,
        max_memory: Optional[int] = None,
        prefill_step_size: int = 2048,
        group: Optional[mx.distributed.Group] = None,
    ):
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queued = max_batch_size, max_queued
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = LRUPromptCache(max_size=1 << 20, max_bytes=prompt_cache_bytes)
        limit = default_limit() if max_memory is None else max_memory
        self.memory = MemoryBudget.of(model, limit, prompt_cache_bytes, prefill_step_size)
        if self.memory.for_requests <= 0:
            raise EVEError(
                f"The memory limit, {describe(limit)}, leaves nothing for requests: the model and the prompt cache "
                f"take {describe(self.memory.fixed)}."
            )
        self.group = group if group is not None and group.size() > 1 else None
        if disk_cache is not None and self.group is not None:
            raise EVEError("A prompt cache on disk is for one process: every rank's KV caches must stay alike.")
        self.disk_cache = disk_cache
        self.leader = self.group is None or self.group.rank() == 0
        self._inbox: "queue.Queue[Optional[Request]]" = queue.Queue()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # an arrival has ended (queued or refused)
        self._arriving = 0  # open ``Arrival``s: requests on their way to the inbox
        self._last_arrival = 0.0  # when the last ``Arrival`` began
        self._waiting = 0  # submitted, not yet in the batch
        self._running = 0  # in the batch, as the engine thread counted them after its last round
        self._closed = False  # by ``close``
        self._stopped = False  # the engine thread has ended (after ``close``, or on an error)
        self._failure: Optional[BaseException] = None
        self._deferred: Optional[Request] = None  # the oldest waiting request, if there was no memory for it
        self._stream: Optional[mx.Stream] = None
        self._generator: Optional[BatchGenerator] = None
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
        arrival: Optional[Arrival] = None,
    ) -> Stream:
        """Queue a request. The prompt, images and settings are checked here, in the caller's thread: ``PromptError``,
        ``ImageError``, ``PromptTooLongError`` or ``SamplingError`` for a bad request, ``QueueFullError`` when the
        queue is full, ``EngineStoppedError`` once the engine has stopped. ``arrival``: the request's, from
        ``arriving``, if it was noted on its way here; it ends either way."""
        with arrival or self.arriving():
            return self._submit(prompt, images, params, system_prompt, max_size)

    def arriving(self) -> Arrival:
        """Note a request on its way to ``submit`` (or several: hold it while submitting them), so that an idle
        engine does not start the first one alone while the others are still being read."""
        return Arrival(self)

    def _submit(self, prompt, images, params, system_prompt, max_size) -> Stream:
        if not self.leader:
            raise EVEError("Only rank 0 of the group takes requests.")
        params = params or SamplingParams()
        params.check(self.model.num_logits)
        if params.grammar is not None:
            if params.stop:
                raise GrammarError("Stop strings cannot be combined with a grammar: they would cut the answer short.")
            check_grammar(params.grammar, self.processor.tokenizer)
        inputs = self.processor(prompt, images, system_prompt, max_size)
        room = self.processor.context_length - inputs.input_ids.size  # at least 1: the processor checked
        params = replace(params, max_tokens=min(params.max_tokens, room))
        request = Request(inputs, params, cache_key(inputs))
        request.reserved = self.memory.request_bytes(inputs.input_ids.size, params.max_tokens, inputs.image_tokens)
        if request.reserved > self.memory.for_requests:
            raise RequestTooLargeError(
                f"This request needs up to {describe(request.reserved)} of memory ({inputs.input_ids.size} prompt "
                f"tokens, {params.max_tokens} to generate), more than the {describe(self.memory.for_requests)} "
                "the server's memory limit leaves for requests: shorten it, or ask for fewer tokens."
            )
        with self._lock:  # the engine thread drains the inbox once it has stopped, under this lock
            if self._closed or self._stopped:
                raise EngineStoppedError(self._stopped_reason())
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
        if self.disk_cache is not None:
            self.disk_cache.close()

    def join(self) -> None:
        """Wait until the engine thread ends (on ranks other than 0: until rank 0's engine closes); ``EVEError``
        if it ended on an error (e.g. rank 0 went away)."""
        self._thread.join()
        if self._failure is not None:
            raise EVEError(f"The engine stopped on an error: {self._failure!r}") from self._failure

    @property
    def failure(self) -> Optional[BaseException]:
        """What stopped the engine thread, if an error did (then no request is answered any more)."""
        return self._failure

    def _stopped_reason(self) -> str:
        if self._failure is None:
            return "The engine is shut down."
        return f"The engine stopped on an error and answers no more requests: {self._failure!r}"

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet in the batch."""
        return self._waiting

    @property
    def running(self) -> int:
        """Requests in the batch."""
        return self._running

    def _cancel(self, request: Request) -> None:
        request.cancelled = True  # the next round's plan drops it, wherever it is by then
        request.events.put(_CANCELLED)

    # Everything below runs on the engine thread.

    def _run(self) -> None:
        self._stream = mx.new_stream(mx.default_device())
        self._generator = self._new_generator()
        running: Dict[int, Request] = {}
        try:
            with mx.stream(self._stream):
                if self.group is not None:
                    # Sampling draws the same numbers on every rank from rank 0's seed (a request's is in its plan);
                    # MLX's random state is per thread: this one's, which samples.
                    seed = mx.random.randint(0, 2**31 - 1, ()) if self.leader else mx.array(0)
                    mx.random.seed(mx.distributed.all_sum(seed, group=self.group, stream=mx.cpu).item())
                while self._serve(running):
                    self._running = len(running)
        except BaseException as error:
            self._failure = error
            logger.critical("The engine stopped on an error: %r", error, exc_info=error)
        finally:
            with self._lock:
                self._stopped = True
            unfinished = list(running.values()) + [self._deferred]
            while not self._inbox.empty():
                unfinished.append(self._inbox.get())
            stopped = EngineStoppedError(self._stopped_reason())
            for request in unfinished:
                if request is not None:
                    request.events.put(stopped)
            self._running = 0
            self._generator.close()
            mx.clear_streams()

    def _new_generator(self) -> BatchGenerator:
        self._images = ImageEmbeddings(self.max_batch_size)
        return EVEBatchGenerator(
            self.model,
            self._images,
            stop_tokens=[[t] for t in self.processor.tokenizer.eos_token_ids],
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=self.max_batch_size,
            prefill_step_size=self.prefill_step_size,
            stream=self._stream,
        )

    def _serve(self, running: Dict[int, Request]) -> bool:
        """One round, the same on every rank: the plan (rank 0 decides it, and sends it to the others), its
        requests join the batch and its cancelled ones leave, then one decode step. False once closed."""
        plan = self._decide(running) if self.leader else None
        if self.group is not None:
            plan = broadcast_plan(plan, self.group)
        if plan.close:
            return False
        for request in plan.admitted:
            self._admit(request, running)
        for uid in plan.cancelled:
            request = running.pop(uid, None)
            if request is not None:
                self._generator.remove([uid])
                self._images.release(request.slot)
        if running:
            self._step(running)
        elif not self.leader:
            time.sleep(_IDLE_ROUND_S)  # rank 0 waits as long for a request before it sends the next plan
        return True

    def _step(self, running: Dict[int, Request]) -> None:
        """One decode step of the batch. A request whose own part of it (its sampler, its logits processors, the
        delivery of its token) fails, fails alone; the others go on, their tokens unchanged. A step that fails as a
        whole (the model's forward pass, which all rows share) fails the requests in it, not the engine."""
        random_state = mx.random.state[0]
        try:
            responses = self._generator.next_generated()
        except Exception as error:
            _restore_random_state(random_state)  # see ``_guarded``
            logger.error("A decode step failed for %d requests", len(running), exc_info=error)
            for request in list(running.values()):
                request.events.put(RequestFailedError(f"Generating the answer failed: {error}"))
            running.clear()
            self._generator.close()
            self._generator = self._new_generator()  # the old one's caches may hold the failed computation
            return
        failed = [r for r in running.values() if r.failure is not None]  # in their sampler or processors
        for response in responses:
            request = running.get(response.uid)
            if request is None or request.failure is not None:
                continue
            try:
                self._deliver(response, running)
            except Exception as error:
                request.failure = error
                failed.append(request)
        for request in failed:
            self._fail(request, running)

    def _fail(self, request: Request, running: Dict[int, Request]) -> None:
        """End a running request on its own ``failure``; the batch goes on without it."""
        logger.error("Request %d failed", request.uid, exc_info=request.failure)
        running.pop(request.uid, None)
        self._generator.remove([request.uid])
        self._images.release(request.slot)
        request.events.put(RequestFailedError(f"Generating the answer failed: {request.failure}"))

    def _decide(self, running: Dict[int, Request]) -> Plan:
        """Rank 0's plan: waiting requests join while there is room (waiting for one when none runs), and the
        running requests cancelled since the last round leave."""
        if self._closed:
            return Plan(close=True)
        admitted: List[Request] = []
        idle = _IDLE_ROUND_S if self.group is not None else None
        held = sum(r.reserved for r in running.values())
        gathering = None  # till when an engine that was idle waits for more requests to prefill with the first
        while len(running) + len(admitted) < self.max_batch_size:
            request, self._deferred = self._deferred, None
            if request is None:
                try:
                    request = self._next_request(not running and not admitted, idle, gathering)
                except queue.Empty:
                    break
                if not running and gathering is None:
                    gathering = time.monotonic() + _GATHER_S
            if request is None:
                for request in admitted:  # back in the inbox, whose requests all end with an error when closing
                    self._inbox.put(request)
                return Plan(close=True)
            if (running or admitted) and held + request.reserved > self.memory.for_requests:
                self._deferred = request  # the first to join once the memory it needs is free
                break
            with self._lock:
                self._waiting -= 1
            if not request.cancelled:
                admitted.append(request)
                held += request.reserved
        cancelled = [uid for uid, request in running.items() if request.cancelled]
        # A request cancelled from now on is in ``running`` by the next round; one cancelled until now never starts.
        return Plan([r for r in admitted if not r.cancelled], cancelled)

    def _next_request(self, idle_engine: bool, idle: Optional[float], gathering: Optional[float]) -> Optional[Request]:
        """The next request of the inbox (``queue.Empty`` if none comes): waiting for one if the engine is idle;
        until ``gathering``, while requests are on their way (``Arrival``) or one began less than ``_ARRIVALS_S``
        ago, for those that arrive with the first one of an idle engine, so that they are prefilled together rather
        than the first alone while the others are still being read; else only one already there."""
        if idle_engine:
            return self._inbox.get(timeout=idle)
        if gathering is not None:
            with self._arrived:  # a request is in the inbox before its arrival ends
                while self._inbox.empty():
                    until = gathering if self._arriving else min(gathering, self._last_arrival + _ARRIVALS_S)
                    if (left := until - time.monotonic()) <= 0:
                        break
                    self._arrived.wait(left)
        return self._inbox.get(block=False)

    def _admit(self, request: Request, running: Dict[int, Request]) -> None:
        """The request into the generator, which prefills it with the others that join now, in chunks between
        decode steps: its prompt less what the prompt cache holds, its image tokens as virtual ids
        (``batching.py``)."""
        params = request.params
        request.admitted = time.perf_counter()
        try:
            processors = [_guarded(p, request, _unchanged) for p in params.logits_processors(self.processor.tokenizer)]
            sampler = _guarded(params.sampler(), request, _greedy)
            cache, reused = self._cached(request)
            ids = np.asarray(request.inputs.input_ids)
            if (ids[reused:] == IMAGE_TOKEN_ID).any():
                features = mx.concatenate([self.model.encode_image(p) for p in request.inputs.pixel_values])
                mx.eval(features)
                request.slot, ids = self._images.add(ids, features)
            if params.seed is not None:
                mx.random.seed(params.seed)
            (request.uid,) = self._generator.insert(
                [ids[reused:].tolist()],
                max_tokens=[params.max_tokens],
                caches=[cache],
                # Penalties see the prompt's text: the cached part's, then what the generator feeds of the rest.
                all_tokens=[text_ids(ids[:reused].tolist())],
                samplers=[sampler],
                logits_processors=[processors],
            )
        except Exception as error:
            # Every rank fails alike: the request was checked on submit, so what is left to fail is the same
            # computation on the same inputs. Only a failure of one rank alone (out of memory) breaks the step.
            logger.error("A request failed before its first token", exc_info=error)
            self._images.release(request.slot)
            request.events.put(
                error if isinstance(error, EVEError) else RequestFailedError(f"Reading the prompt failed: {error}")
            )
            return
        request.cached_tokens = reused
        request.detokenizer = self.processor.tokenizer.detokenizer
        running[request.uid] = request

    def _cached(self, request: Request) -> Tuple[Optional[List[Any]], int]:
        """The prompt cache's KV cache of the longest start of the prompt it holds (at most all but its last token,
        which the generator feeds), and how many tokens that is; ``None, 0`` if it holds none."""
        cache, rest = self.prompt_cache.fetch_nearest_cache(_MODEL, request.key)
        held = request.key[: len(request.key) - len(rest)]
        reused = 0 if cache is None else reuse_prefix(cache, held, request.key)
        if self.disk_cache is not None and self.disk_cache.held(request.key) > reused:
            found = self.disk_cache.fetch(request.key)
            if found is not None:
                on_disk = reuse_prefix(found[1], request.key[: found[0]], request.key)
                if on_disk > reused:
                    cache, reused = found[1], on_disk
        return (cache if reused else None), reused

    def _deliver(self, response, running: Dict[int, Request]) -> None:
        """Hand one generated token to its request: text (held back while it may begin a stop string),
        log-probabilities, and at the end the usage; the finished request's cache goes to the prompt cache."""
        request = running[response.uid]
        params, tokenizer = request.params, self.processor.tokenizer
        finish = response.finish_reason
        if not request.generated:  # the prompt is prefilled: its image embeddings are done with
            request.started = time.perf_counter()
            request.prompt_seconds = request.started - request.admitted
            self._images.release(request.slot)
        request.generated.append(response.token)
        if not (finish == "stop" and response.token in tokenizer.eos_token_ids):
            request.detokenizer.add_token(response.token)
        if finish is not None:
            request.detokenizer.finalize()
        checked = len(request.text)  # no stop string ends before this
        request.text += request.detokenizer.last_segment
        cache = response.prompt_cache
        stop_at, stop = _find_stop(request.text, params.stop, checked)
        if stop is not None:
            request.text, finish = request.text[:stop_at], "stop"
            if response.finish_reason is None:
                cache = self._generator.remove([response.uid], return_prompt_caches=True)[response.uid][0]
        hold = 0 if finish is not None else _stop_prefix(request.text, params.stop)
        event = Event(request.text[request.sent : len(request.text) - hold], response.token)
        request.sent = len(request.text) - hold
        if params.top_logprobs is not None:
            event.logprob, event.top_logprobs = _logprobs(
                response.logprobs, response.token, params.top_logprobs, tokenizer
            )
        if finish is not None:
            del running[response.uid]
            event.finish_reason, event.usage, event.stop = finish, self._usage(request), stop
            self._keep_image_prefix(request, cache)
            self.prompt_cache.insert_cache(_MODEL, request.key + request.generated, cache)
        request.events.put(event)

    def _keep_image_prefix(self, request: Request, cache: List[Any]) -> None:
        """With a disk cache, the KV cache of the prompt up to its last image: what another question about the same
        images starts with."""
        if self.disk_cache is None:
            return
        spans = image_spans(request.inputs.input_ids)
        if not spans or not can_trim_prompt_cache(cache):
            return
        self.disk_cache.store_later(request.key, cache, spans[-1][1])  # it keeps one copy of each

    def _usage(self, request: Request) -> Usage:
        return Usage(
            prompt_tokens=request.inputs.input_ids.size,
            image_tokens=request.inputs.image_tokens,
            cached_tokens=request.cached_tokens,
            completion_tokens=len(request.generated),
            prompt_seconds=request.prompt_seconds,
            generation_seconds=time.perf_counter() - request.started,
        )


def _guarded(function: Callable, request: Request, stand_in: Callable[[mx.array], mx.array]) -> Callable:
    """A request's sampler or logits processor as the decode step calls it, while it builds the step's graph for
    every row: should it raise, the request keeps the error (to fail on after the step) and ``stand_in`` of the
    row's scores takes its place, so that the step goes on for the other rows."""

    def call(*args):
        random_state = mx.random.state[0]
        try:
            return function(*args)
        except Exception as error:
            # mlx-lm's samplers are compiled with the random state as an input: one that raises while it is traced
            # leaves a placeholder in the state's place, and every later draw would fail.
            _restore_random_state(random_state)
            request.failure = request.failure or error
            return stand_in(args[-1])

    return call


def _restore_random_state(key: mx.array) -> None:
    """MLX's random state back to ``key``: seeding with its two 32-bit words makes that very key."""
    high, low = key.tolist()
    mx.random.seed((high << 32) | low)


def _unchanged(logits: mx.array) -> mx.array:
    return logits


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def cache_key(inputs: ModelInputs) -> List[Any]:
    """The prompt's token ids, each image token replaced by a digest of its image as the model will see it
    (pixels and resized size): another picture of the same size must not reuse the cache."""
    key: List[Any] = inputs.input_ids.tolist()
    digests = []
    for image in inputs.images:
        digest = hashlib.sha256(image.tobytes())
        digest.update(repr((image.mode, image.size, inputs.image_processor.target_size(*image.size))).encode())
        digests.append(digest.hexdigest())
    for (start, end), digest in zip(image_spans(inputs.input_ids), digests, strict=True):
        key[start:end] = [digest] * (end - start)
    return key


def _find_stop(text: str, stops: Sequence[str], checked: int) -> Tuple[int, Optional[str]]:
    """Where the earliest stop string in ``text`` begins, and which it is (``-1, None`` if there is none), given
    that none ends within ``text[:checked]``: only the new text and the few characters before it are searched,
    so that each token costs the same however long the answer is."""
    found = []
    for s in stops:
        at = text.find(s, max(0, checked - len(s) + 1)) if s else -1
        if at >= 0:
            found.append((at, s))
    return min(found) if found else (-1, None)


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _logprobs(logprobs: mx.array, token: int, top: int, tokenizer) -> Tuple[float, List[Tuple[str, float]]]:
    values = np.asarray(logprobs.astype(mx.float32))
    best = np.argsort(-values)[:top] if top > 0 else []
    return float(values[token]), [(tokenizer.decode([int(t)]), float(values[t])) for t in best]
