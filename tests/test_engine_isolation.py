"""One request cannot harm another: settings MLX cannot take are refused on submit (``SamplingError``), a request
whose own part of a decode step fails leaves the batch alone, cancellations at every stage leave it intact, and an
engine whose thread stops says so to every caller."""

import threading

import pytest
from mlx_lm.sample_utils import make_sampler

from mlx_eve import batching, generate
from mlx_eve.engine import Engine, EngineStoppedError, RequestFailedError
from mlx_eve.errors import EVEError
from mlx_eve.request import SamplingError, SamplingParams

NEIGHBOURS = ["Describe the picture.", "What is it?", "Hello there"]


@pytest.fixture(params=["v1", "v2"])
def model(request, v1_model, v2_model):
    return v1_model if request.param == "v1" else v2_model


def text(stream) -> str:
    return "".join(event.text for event in stream)


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"top_k": 512}, "top_k"),  # the vocabulary of the tiny models is smaller than their 512 rows
        ({"top_k": 10**30}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e-300}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 1e-308}, "repetition_penalty"),
        ({"repetition_context_size": 2**31}, "repetition_context_size"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"logit_bias": ((10**6, 1.0),)}, "logit_bias"),
        ({"logit_bias": ((3, float("nan")),)}, "logit_bias"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"stop": ("x",) * 17}, "stop"),
        ({"stop": ("x" * 257,)}, "stop"),
    ],
)
def test_settings_mlx_cannot_take_are_refused_on_submit(v2_model, settings, field):
    engine = Engine(*v2_model)
    try:
        with pytest.raises(SamplingError) as refused:
            engine.submit("Hi", params=SamplingParams(**settings))
        assert refused.value.field == field and f"'{field}'" in str(refused.value)
        assert text(engine.submit("Hi", params=SamplingParams(max_tokens=3)))  # the engine still answers
    finally:
        engine.close()


@pytest.mark.parametrize("settings", [{"top_k": 512}, {"temp": float("nan")}, {"repetition_context_size": 2**31}])
def test_the_python_api_refuses_them_alike(v2_model, settings):
    with pytest.raises(SamplingError):
        generate(*v2_model, "Hi", max_tokens=2, **settings)


def test_the_largest_seed_mlx_takes_is_accepted(v2_model):
    engine = Engine(*v2_model)
    try:
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=2**64 - 1)
        assert text(engine.submit("Hi", params=params)) == text(engine.submit("Hi", params=params))
    finally:
        engine.close()


class BadSampler(SamplingParams):
    """A request whose sampler raises while mlx-lm traces it, as its top-k sampler does for a k beyond the
    vocabulary: the random state every request draws from is left a placeholder unless the engine restores it."""

    def sampler(self):
        return make_sampler(1.0, top_k=10**6)


class FailsAtToken(SamplingParams):
    """A request whose logits processor raises at its third token."""

    def logits_processors(self, tokenizer):
        calls = []

        def processor(tokens, logits):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("this request's processor failed")
            return logits

        return [processor]


@pytest.mark.parametrize("failing", [BadSampler, FailsAtToken])
def test_a_request_that_fails_in_the_step_fails_alone(model, failing):
    greedy = SamplingParams(max_tokens=10)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=11)
    engine = Engine(*model)
    try:
        alone = [text(engine.submit(p, params=greedy)) for p in NEIGHBOURS]
        alone_sampled = text(engine.submit("Tell me more.", params=sampled))
        # The failing request joins first; the sampled neighbour after it draws from the shared random state.
        bad = engine.submit("Fail, please.", params=failing(max_tokens=10))
        streams = [engine.submit(p, params=greedy) for p in NEIGHBOURS]
        seeded = engine.submit("Tell me more.", params=sampled)
        with pytest.raises(RequestFailedError, match="Generating the answer failed"):
            text(bad)
        assert [text(s) for s in streams] == alone
        assert text(seeded) == alone_sampled
        # A request with no seed draws from the random state as the failed one left it.
        unseeded = engine.submit("Tell me more.", params=SamplingParams(max_tokens=10, temperature=1.0))
        assert list(unseeded)[-1].finish_reason in ("stop", "length")
        assert text(engine.submit("What is it?", params=greedy)) == alone[1]  # and afterwards
        assert engine.running == 0 and engine.failure is None
    finally:
        engine.close()


def test_cancelling_at_every_stage_leaves_the_batch_intact(model, monkeypatch):
    greedy = SamplingParams(max_tokens=12)
    # Prompts prefilled 8 tokens at a time, a round each: a cancellation can come in the middle of a prefill.
    engine = Engine(*model, max_batch_size=4, prefill_step_size=8)
    try:
        alone = [text(engine.submit(p, params=greedy)) for p in NEIGHBOURS]
        prefill, calls = batching.PrefillModel.__call__, []

        def cancelled_during_prefill(self, inputs, cache=None):
            calls.append(inputs.shape)
            if len(calls) == 2:  # the batch's second chunk: the prefill has begun, and goes on
                cancelled.cancel()
            return prefill(self, inputs, cache)

        monkeypatch.setattr(batching.PrefillModel, "__call__", cancelled_during_prefill)
        before_admission = engine.submit("Never started.", params=SamplingParams(max_tokens=5))
        before_admission.cancel()
        cancelled = engine.submit(
            "Cancelled in its prefill, a long prompt indeed.", params=SamplingParams(max_tokens=7)
        )
        streams = [engine.submit(p, params=greedy) for p in NEIGHBOURS]
        first_token = engine.submit("Cancelled after one token.", params=SamplingParams(max_tokens=50))
        next(iter(first_token))
        first_token.cancel()
        assert [text(s) for s in streams] == alone
        assert list(before_admission) == [] and list(cancelled) == []
        assert len(calls) > 2  # in several chunks
        text(engine.submit("Hi", params=SamplingParams(max_tokens=2)))
        assert engine.running == 0 and engine.waiting == 0
    finally:
        engine.close()


def test_an_engine_whose_thread_stops_fails_every_request_at_once(v2_model):
    engine = Engine(*v2_model)
    assert text(engine.submit("Hi", params=SamplingParams(max_tokens=2)))
    started = threading.Event()
    release = threading.Event()
    decide = engine._decide

    def broken(running):
        if running:
            started.set()
            release.wait(10)
            raise RuntimeError("a bug in the engine's loop")
        return decide(running)

    engine._decide = broken
    running = engine.submit("Describe the picture.", params=SamplingParams(max_tokens=40))
    assert started.wait(10)
    waiting = engine.submit("What is it?", params=SamplingParams(max_tokens=4))
    release.set()
    for stream in (running, waiting):
        with pytest.raises(EngineStoppedError, match="a bug in the engine's loop"):
            text(stream)
    assert isinstance(engine.failure, RuntimeError)
    with pytest.raises(EngineStoppedError, match="stopped on an error"):
        engine.submit("Anyone there?")
    with pytest.raises(EVEError, match="stopped on an error"):
        engine.join()
