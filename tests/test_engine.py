"""The serving engine: batched answers equal one-at-a-time answers, the prompt cache is reused only for the
same images, stop strings, log-probabilities, cancellation and a full queue."""

import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from mlx_eve import batch_generate, generate
from mlx_eve.engine import Engine, QueueFullError, SamplingParams
from mlx_eve.errors import EVEError, PromptError


def picture(size, colour, box):
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    return image


RED = picture((320, 240), (200, 0, 0), (40, 40, 160, 160))
BLUE = picture((320, 240), (0, 0, 200), (150, 60, 280, 200))  # the same size: the same number of image tokens


@pytest.fixture(params=["v1", "v2"])
def model(request, v1_model, v2_model):
    return v1_model if request.param == "v1" else v2_model


@pytest.fixture
def engine(model):
    engine = Engine(*model)
    yield engine
    engine.close()


def test_batched_answers_equal_one_at_a_time_greedy_answers(model):
    prompts = [
        "What is it?",
        "Describe the image.",
        "Hello there",
        [{"role": "user", "content": "<image> and <image>?"}],
    ]
    images = [RED, BLUE, None, [BLUE, RED]]
    alone = [generate(*model, p, image=i, max_tokens=12) for p, i in zip(prompts, images)]
    assert batch_generate(*model, prompts, images, max_tokens=12) == alone
    assert len(set(alone)) > 1  # the prompts really differ


def test_a_resent_conversation_reuses_its_cache_but_not_for_another_image(engine, model):
    first = list(engine.submit("What is it?", [RED], SamplingParams(max_tokens=6)))
    answer = "".join(e.text for e in first)
    assert first[-1].usage.cached_tokens == 0 and first[-1].usage.image_tokens == model[1].image_processor.num_tokens(
        *RED.size
    )
    conversation = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And the colour?"},
    ]
    again = list(engine.submit(conversation, [RED], SamplingParams(max_tokens=6)))
    usage = again[-1].usage
    assert usage.cached_tokens >= first[-1].usage.prompt_tokens - 1  # the whole first prompt, image included
    assert "".join(e.text for e in again) == generate(*model, conversation, image=RED, max_tokens=6)
    other = list(engine.submit(conversation, [BLUE], SamplingParams(max_tokens=6)))
    text_before_image = model[1](conversation, [BLUE]).input_ids.tolist().index(-200)
    assert other[-1].usage.cached_tokens == text_before_image  # stops where the image differs
    assert "".join(e.text for e in other) == generate(*model, conversation, image=BLUE, max_tokens=6)


def test_stop_strings_end_the_answer_before_them(engine, model):
    full = generate(*model, "Describe the image.", image=BLUE, max_tokens=20)
    stop = full[4:7]
    events = list(engine.submit("Describe the image.", [BLUE], SamplingParams(max_tokens=20, stop=[stop])))
    text = "".join(e.text for e in events)
    assert text == full[: full.index(stop)] and events[-1].finish_reason == "stop"
    events = list(engine.submit("Describe the image.", [BLUE], SamplingParams(max_tokens=3)))
    assert events[-1].finish_reason == "length" and events[-1].usage.completion_tokens == 3


def test_log_probabilities_are_those_of_the_model(engine, model):
    m, processor = model
    events = list(engine.submit("What is it?", [RED], SamplingParams(max_tokens=1, top_logprobs=3)))
    inputs = processor("What is it?", [RED])
    logits = m(inputs.input_ids[None], input_embeddings=m.embed_inputs(inputs.input_ids, inputs.pixel_values)[None])
    last = np.asarray(logits[0, -1].astype(mx.float32), dtype=np.float64)
    reference = last - np.log(np.exp(last - last.max()).sum()) - last.max()  # log-softmax in numpy
    best = np.argsort(-reference)[:3]
    assert events[0].token == best[0]
    np.testing.assert_allclose(events[0].logprob, reference[best[0]], atol=1e-4)
    np.testing.assert_allclose([p for _, p in events[0].top_logprobs], reference[best], atol=1e-4)
    assert [t for t, _ in events[0].top_logprobs] == [processor.tokenizer.decode([int(t)]) for t in best]


def test_a_cancelled_request_frees_its_place_at_once(model):
    engine = Engine(*model, max_batch_size=1)
    try:
        long = engine.submit("Describe the image.", [RED], SamplingParams(max_tokens=100000))
        next(iter(long))
        long.cancel()
        assert len(list(long)) < 100000  # reading a cancelled stream ends
        tic = time.perf_counter()
        events = list(engine.submit("Hello", None, SamplingParams(max_tokens=4)))
        assert events[-1].usage.completion_tokens == 4 and time.perf_counter() - tic < 30
    finally:
        engine.close()


def test_bad_requests_fail_at_submit_and_a_full_queue_says_so(model):
    engine = Engine(*model, max_queued=0)
    try:
        with pytest.raises(PromptError, match="placeholder"):
            engine.submit("<image> <image>", [RED])
        with pytest.raises(QueueFullError):
            engine.submit("Hello")
    finally:
        engine.close()


def test_a_seed_makes_sampling_repeatable(engine):
    def sample(seed):
        params = SamplingParams(max_tokens=12, temperature=1.5, seed=seed)
        return [e.token for e in engine.submit("Describe the image.", [RED], params)]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_max_tokens_is_cut_to_the_room_left_in_the_context(checkpoints):
    import tiny_checkpoints

    from mlx_eve import load

    path = checkpoints(
        "v2-short-context", "v2", max_position_embeddings=128, preprocessor=tiny_checkpoints.v2_preprocessor(224)
    )
    model, processor = load(str(path))
    engine = Engine(model, processor)
    try:
        events = list(engine.submit("Hi", None, SamplingParams(max_tokens=10**9)))
    finally:
        engine.close()
    usage = events[-1].usage
    room = 128 - usage.prompt_tokens
    assert usage.completion_tokens <= room and (events[-1].finish_reason == "stop" or usage.completion_tokens == room)


def test_closing_ends_every_stream(model):
    engine = Engine(*model, max_batch_size=1)
    running = engine.submit("Describe the image.", [RED], SamplingParams(max_tokens=100000))
    waiting = engine.submit("Hello", None, SamplingParams(max_tokens=100000))
    next(iter(running))
    engine.close()
    for stream in (running, waiting):
        with pytest.raises(Exception, match="shut down"):
            list(stream)


def test_requests_that_arrive_together_are_prefilled_together(model, monkeypatch):
    """Text and image prompts of different lengths, images of different sizes, one whose start the prompt cache
    holds: one prompt batch, in chunks, and each greedy answer ``generate``'s."""
    from mlx_eve import batching

    prompts = [
        ("What is it?", [RED]),
        ("Hello there, how are you today?", None),
        ("Describe both.", [BLUE, picture((150, 300), (0, 150, 0), (20, 20, 120, 200))]),
        ("Hi", None),
    ]
    params = SamplingParams(max_tokens=10)
    alone = [generate(*model, p, image=i, max_tokens=10) for p, i in prompts]
    engine = Engine(*model, max_batch_size=4, prefill_step_size=16)
    try:
        list(engine.submit(*prompts[0], params))  # its prompt is then in the prompt cache
        decide, release = engine._decide, threading.Event()

        def all_at_once(running):
            release.wait(10)
            return decide(running)

        engine._decide = all_at_once
        shapes = []
        prefill = batching.PrefillModel.__call__
        monkeypatch.setattr(
            batching.PrefillModel,
            "__call__",
            lambda self, x, cache=None: shapes.append(x.shape) or prefill(self, x, cache),
        )
        streams = [engine.submit(p, i, params) for p, i in prompts]
        release.set()
        events = [list(s) for s in streams]
        assert ["".join(e.text for e in answer) for answer in events] == alone
        first = events[0][-1].usage
        assert first.cached_tokens == first.prompt_tokens - 1  # the others share no more than the system prompt
        # The cached one only has its last token to feed; the three others are prefilled as one batch, in chunks.
        assert max(rows for rows, _ in shapes) == 3 and len(shapes) > 3
    finally:
        engine.close()


def test_an_idle_engine_prefills_requests_that_arrive_together_together(v2_model, monkeypatch):
    """Four threads submit at the same moment while their arrival is noted (as the server notes each request as it
    comes in): the first request does not start alone while the others are still being tokenized, and no answer
    changes for it."""
    from mlx_eve import batching

    prompts = ["What is it?", "Hello there, how are you today?", "Describe it.", "Hi"]
    params = SamplingParams(max_tokens=6)
    alone = [generate(*v2_model, p, max_tokens=6) for p in prompts]
    shapes, prefill = [], batching.PrefillModel.__call__
    monkeypatch.setattr(
        batching.PrefillModel, "__call__", lambda self, x, cache=None: shapes.append(x.shape) or prefill(self, x, cache)
    )
    engine = Engine(*v2_model, max_batch_size=4, prompt_cache_bytes=0)
    try:
        start, streams = threading.Barrier(len(prompts)), [None] * len(prompts)
        arrivals = [engine.arriving() for _ in prompts]

        def submit(i):
            start.wait()
            streams[i] = engine.submit(prompts[i], params=params, arrival=arrivals[i])

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert ["".join(e.text for e in s) for s in streams] == alone
        assert shapes[0][0] == len(prompts)
    finally:
        engine.close()


def test_an_idle_engine_waits_for_the_requests_on_their_way_only(v2_model, monkeypatch):
    """With nothing else on its way a request starts without waiting out the time allowed for others; one that is
    on its way holds the start back until it is submitted, or until it is refused."""
    from mlx_eve import engine as engine_module

    monkeypatch.setattr(engine_module, "_GATHER_S", 600.0)
    params = SamplingParams(max_tokens=2)
    engine = Engine(*v2_model, prompt_cache_bytes=0)
    try:
        began = time.monotonic()
        assert len(list(engine.submit("Hi", params=params))) == 2
        assert time.monotonic() - began < 60  # far less than the 600 s it would have waited

        arrival = engine.arriving()
        held = engine.submit("Hello", params=params)
        events = iter(held)
        first = []
        reader = threading.Thread(target=lambda: first.append(next(events)))
        reader.start()
        reader.join(1.0)
        assert not first  # still waiting for the one on its way
        with pytest.raises(EVEError):
            engine.submit("word " * 20000, params=params, arrival=arrival)  # refused: too long for the context
        reader.join(60)
        assert first and len([*first, *events]) == 2
    finally:
        engine.close()


def test_penalties_see_text_only_when_a_cached_start_holds_an_image_and_the_rest_another(model):
    """The prompt cache holds the first turn, image and all; the follow-up brings a second image: the penalties of
    the follow-up see the conversation's text ids only, as ``generate``'s do."""
    params = SamplingParams(max_tokens=8, repetition_penalty=1.3, presence_penalty=0.5)
    first = [{"role": "user", "content": "<image>\nWhat is it?"}]
    engine = Engine(*model)
    try:
        answer = "".join(e.text for e in engine.submit(first, [RED], params))
        conversation = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "<image>\nAnd?"}]
        events = list(engine.submit(conversation, [RED, BLUE], params))
    finally:
        engine.close()
    assert events[-1].usage.cached_tokens > model[1].image_processor.num_tokens(*RED.size)
    expected = generate(
        *model, conversation, image=[RED, BLUE], max_tokens=8, repetition_penalty=1.3, presence_penalty=0.5
    )
    assert "".join(e.text for e in events) == expected
