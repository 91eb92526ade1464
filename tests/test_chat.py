"""ChatSession: KV-cache reuse across turns (measured by what the decoder runs), trimming, stopping, errors;
and the chat app's handlers without a browser."""

import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny_checkpoints

from mlx_eve import load, stream_generate
from mlx_eve.chat import ChatSession
from mlx_eve.errors import ImageError, PromptTooLongError

ROOT = Path(__file__).resolve().parent.parent


def template_answer(processor, question, answer, image):
    """The token ids EVE's template gives ``answer`` after the question, up to and including its stop token."""
    prompt = processor(question, image).input_ids.tolist()
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "?"},
    ]
    ids = processor(conversation, image).input_ids.tolist()
    assert ids[: len(prompt)] == prompt
    stop = processor.tokenizer.convert_tokens_to_ids(processor.template.answer_end)
    end = ids.index(stop, len(prompt))
    return ids[len(prompt) : end + 1]


def forcing(tokens_to_say):
    """A logits processor that makes the model say exactly ``tokens_to_say``."""
    start = []

    def force(tokens, logits):
        start.append(start[0] if start else tokens.size)
        step = min(tokens.size - start[0], len(tokens_to_say) - 1)
        return logits + 1e4 * (mx.arange(logits.shape[-1]) == tokens_to_say[step])

    return force


@pytest.fixture
def decoder_tokens(monkeypatch):
    """Counts the token positions every decoder call runs (prefill chunks and decode steps) and image encodings."""
    counts = {"tokens": 0, "images": 0}

    def watch(model):
        decoder = type(model.model)
        run_decoder, encode_image = decoder.__call__, type(model).encode_image

        def counting_decoder(self, inputs, *args, **kwargs):
            counts["tokens"] += inputs.shape[-1]
            return run_decoder(self, inputs, *args, **kwargs)

        def counting_encoder(self, pixels):
            counts["images"] += 1
            return encode_image(self, pixels)

        monkeypatch.setattr(decoder, "__call__", counting_decoder)
        monkeypatch.setattr(type(model), "encode_image", counting_encoder)
        return counts

    return watch


def greedy(responses):
    responses = list(responses)
    return [r.token for r in responses], np.array([r.logprobs[r.token].item() for r in responses]), responses


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_follow_up_processes_only_the_new_tokens(family, v1_model, v2_model, images, decoder_tokens):
    model, processor = v1_model if family == "v1" else v2_model
    image = images["wide"]
    first, follow_up = "What shapes are in the picture?", "Which one is on the right?"
    answer = template_answer(processor, first, "There are two shapes: a red circle and a blue square.", image)
    counts = decoder_tokens(model)
    session = ChatSession(model, processor, image)

    _, _, turn_1 = greedy(session.stream(first, max_tokens=100, logits_processors=[forcing(answer)]))
    prompt_1 = processor(first, image).input_ids.size
    assert [r.token for r in turn_1] == answer and turn_1[-1].finish_reason == "stop"
    assert turn_1[-1].prompt_tokens == prompt_1 and turn_1[-1].reused_tokens == 0
    assert turn_1[-1].new_image_tokens == turn_1[-1].image_tokens > 40
    assert counts == {"tokens": prompt_1 + len(answer), "images": 1}
    assert session.messages[-1]["role"] == "assistant"

    counts.update(tokens=0, images=0)
    tokens, logprobs, turn_2 = greedy(session.stream(follow_up, max_tokens=6))
    conversation = session.messages[:-1]
    prompt_2 = processor(conversation, image).input_ids.size
    # Turn 1's prompt and its whole answer (stop token included) came from the cache ...
    assert turn_2[-1].reused_tokens == prompt_1 + len(answer)
    # ... so the decoder ran only the new question's tokens, then one position per generated token.
    new_tokens = prompt_2 - prompt_1 - len(answer)
    assert 0 < new_tokens < prompt_1 / 2 and turn_2[-1].prompt_tokens == new_tokens
    assert counts == {"tokens": new_tokens + len(tokens), "images": 0}
    assert turn_2[-1].new_image_tokens == 0 and turn_2[-1].image_tokens == turn_1[-1].image_tokens

    # The same answer as running the whole conversation from scratch.
    uncached, uncached_logprobs, _ = greedy(stream_generate(model, processor, conversation, image, max_tokens=6))
    assert tokens == uncached
    np.testing.assert_allclose(logprobs, uncached_logprobs, atol=1e-4)


def test_first_turn_is_stream_generate(v2_model, images):
    model, processor = v2_model
    question = "Describe the image."
    session = ChatSession(model, processor, images["tall"])
    tokens, logprobs, responses = greedy(session.stream(question, max_tokens=8))
    expected, expected_logprobs, expected_responses = greedy(
        stream_generate(model, processor, question, images["tall"], max_tokens=8)
    )
    assert tokens == expected and "".join(r.text for r in responses) == "".join(r.text for r in expected_responses)
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-5)
    assert responses[-1].prompt_tokens == expected_responses[-1].prompt_tokens
    assert session.prompt_cache[0].offset == len(session.cached_ids) == responses[-1].prompt_tokens + len(tokens)


def said_differently(processor, question, answer, image):
    """``answer``'s tokens with the third one spelled out letter by letter: the same text, but not how the
    template tokenizes it again on the next turn."""
    tokenizer = processor.tokenizer
    canonical = template_answer(processor, question, answer, image)
    split = tokenizer.convert_tokens_to_ids(list(tokenizer.convert_ids_to_tokens(canonical[2])))
    assert len(split) > 1
    return canonical[:2] + split + canonical[3:]


def test_an_answer_that_tokenizes_differently_is_trimmed_where_it_diverges(v2_model, images):
    model, processor = v2_model
    question = "What is in the image?"
    said = said_differently(processor, question, "A red circle and a blue square.", images["wide"])
    session = ChatSession(model, processor, images["wide"])
    turn_1 = list(session.stream(question, max_tokens=100, logits_processors=[forcing(said)]))
    assert "".join(r.text for r in turn_1) == session.messages[-1]["content"] == "A red circle and a blue square."
    prompt_1 = turn_1[-1].prompt_tokens
    assert session.prompt_cache[0].offset == prompt_1 + len(said)

    tokens, logprobs, turn_2 = greedy(session.stream("And what else?", max_tokens=5))
    assert turn_2[-1].reused_tokens == prompt_1 + 2
    conversation = session.messages[:-1]
    assert turn_2[-1].prompt_tokens == processor(conversation, images["wide"]).input_ids.size - prompt_1 - 2
    uncached, uncached_logprobs, _ = greedy(
        stream_generate(model, processor, conversation, images["wide"], max_tokens=5)
    )
    assert tokens == uncached
    np.testing.assert_allclose(logprobs, uncached_logprobs, atol=1e-4)


def test_a_cache_that_cannot_be_trimmed_starts_afresh(v2_model, images):
    model, processor = v2_model
    question = "What is in the image?"
    said = said_differently(processor, question, "A red circle and a blue square.", images["wide"])
    session = ChatSession(model, processor, images["wide"], max_kv_size=64)
    turn_1 = list(session.stream(question, max_tokens=100, logits_processors=[forcing(said)]))
    assert turn_1[-1].prompt_tokens > 64  # the rotating cache wrapped around: it can no longer be cut back
    turn_2 = list(session.stream("And what else?", max_tokens=3))[-1]
    assert turn_2.reused_tokens == 0
    assert turn_2.prompt_tokens == processor(session.messages[:-1], images["wide"]).input_ids.size


def test_a_new_system_prompt_or_resolution_recomputes_what_changed(v2_model, v2_path, images, decoder_tokens):
    model, processor = v2_model
    counts = decoder_tokens(model)
    session = ChatSession(model, processor, images["wide"])
    list(session.stream("Hi", max_tokens=3))
    # A different system prompt changes the very first tokens: nothing can be reused.
    turn = list(session.stream("Hi again", max_tokens=3, system_prompt="Be brief."))[-1]
    assert turn.reused_tokens == 0 and turn.new_image_tokens == turn.image_tokens
    # A different resolution changes the image: it is embedded again, at the new size.
    counts.update(images=0)
    tokens, logprobs, responses = greedy(
        session.stream("And now?", max_tokens=3, system_prompt="Be brief.", max_size=96)
    )
    assert counts["images"] == 1 and responses[-1].reused_tokens == 0
    small_model, small_processor = load(str(v2_path), max_size=96)
    assert responses[-1].image_tokens == small_processor.image_processor.num_tokens(320, 240) < turn.image_tokens
    conversation = [{"role": "system", "content": "Be brief."}] + session.messages[:-1]
    expected, expected_logprobs, _ = greedy(
        stream_generate(small_model, small_processor, conversation, images["wide"], max_tokens=3)
    )
    assert tokens == expected
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-4)


def test_stopping_early_keeps_the_partial_answer(v2_model, images):
    model, processor = v2_model
    session = ChatSession(model, processor, images["wide"])
    stream = session.stream("Describe the image.", max_tokens=50)
    partial = [next(stream) for _ in range(3)]
    stream.close()
    assert session.messages[-1] == {"role": "assistant", "content": "".join(r.text for r in partial)}
    assert session.prompt_cache[0].offset == len(session.cached_ids) == partial[0].prompt_tokens + 3

    tokens, _, _ = greedy(session.stream("Go on.", max_tokens=4))
    uncached, _, _ = greedy(stream_generate(model, processor, session.messages[:-1], images["wide"], max_tokens=4))
    assert tokens == uncached


def test_repetition_penalty_sees_the_whole_conversation(v1_model, images):
    model, processor = v1_model
    session = ChatSession(model, processor, images["tall"])
    list(session.stream("What is it?", max_tokens=6))
    options = dict(max_tokens=8, repetition_penalty=1.8, repetition_context_size=64)
    tokens, logprobs, _ = greedy(session.stream("Say it again.", **options))
    expected, expected_logprobs, _ = greedy(
        stream_generate(model, processor, session.messages[:-1], images["tall"], **options)
    )
    assert tokens == expected
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-4)


def test_text_only_conversation(v1_model):
    model, processor = v1_model
    session = ChatSession(model, processor)
    list(session.stream("Hello?", max_tokens=3))
    turn = list(session.stream("How are you?", max_tokens=3))[-1]
    assert turn.image_tokens == 0 and turn.reused_tokens > 0
    assert turn.reused_tokens + turn.prompt_tokens == processor(session.messages[:-1]).input_ids.size


def test_a_bad_image_fails_before_anything_else(v2_model, tmp_path):
    model, processor = v2_model
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="Could not read image"):
        ChatSession(model, processor, tmp_path / "broken.png")


def test_a_conversation_over_the_context_is_an_error_and_stays_usable(checkpoints, images):
    path = checkpoints(
        "v2-short-chat", "v2", max_position_embeddings=160, preprocessor=tiny_checkpoints.v2_preprocessor(224)
    )
    model, processor = load(str(path))
    session = ChatSession(model, processor, images["wide"])
    list(session.stream("Hi", max_tokens=4))
    messages, cached = list(session.messages), list(session.cached_ids)
    with pytest.raises(PromptTooLongError, match="context is 160 tokens. Shorten the text"):
        list(session.stream("word " * 100, max_tokens=4))
    assert session.messages == messages and session.cached_ids == cached
    turn = list(session.stream("Ok?", max_tokens=200))
    # The answer stops at the end of the context.
    assert turn[-1].prompt_tokens + turn[-1].reused_tokens + len(turn) == 160


# --- The app's handlers, without a browser ----------------------------------------------------------------------


@pytest.fixture
def app(v2_model):
    pytest.importorskip("gradio")
    from mlx_eve.chat_app import ChatApp

    app = ChatApp(*v2_model, "tiny")
    yield app
    app.close()


def send(app, tab, history, text, image=None, max_tokens=5):
    """What the page does on Enter: ``submit``, then ``respond`` with the default settings."""
    history, _, pending, _ = app.submit({"text": text, "files": [str(image)] if image else []}, history, tab, None)
    updates = list(app.respond(history, tab, pending, 0.0, 1.0, max_tokens, 1.0, "", app.default_max_size))
    return updates[-1]


def test_app_reports_a_bad_upload_in_the_chat_and_keeps_the_conversation(app, images, tmp_path):
    from mlx_eve.chat_app import Tab

    tab = Tab()
    history, footer = send(app, tab, [], "What is it?", images["wide"])
    session = tab.session
    assert "(processed)" in footer and len(session.messages) == 2
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    history, _ = send(app, tab, history, "And this one?", broken)
    assert history[-3:-1] == [
        {"role": "user", "content": "📎 broken.jpg"},
        {"role": "user", "content": "And this one?"},
    ]
    assert history[-1]["content"].startswith("⚠️ Could not read image broken.jpg: ")
    assert tab.session is session and len(session.messages) == 2
    history, footer = send(app, tab, history, "Go on.")
    assert "(reused from cache)" in footer and len(session.messages) == 4


def test_app_starts_a_new_conversation_for_a_new_image(app, images):
    from mlx_eve.chat_app import Tab

    tab = Tab()
    history, _ = send(app, tab, [], "What is it?", images["wide"])
    first_session = tab.session
    history, footer = send(app, tab, history, "", images["tall"])
    assert tab.session is not first_session and len(tab.session.messages) == 2
    assert tab.session.messages[0]["content"] == "Describe the image."
    assert history[3]["metadata"]["title"].startswith("New image") and history[4]["content"] == {
        "path": str(images["tall"])
    }
    assert "(processed)" in footer and "0 reused from cache" in footer


def test_app_answers_with_an_evev1_model(v1_model, images):
    pytest.importorskip("gradio")
    from mlx_eve.chat_app import ChatApp, Tab

    app = ChatApp(*v1_model, "tiny v1")
    app.build()
    history, footer = send(app, Tab(), [], "What is it?", images["tall"])
    app.close()
    assert "(processed)" in footer and history[-1]["role"] == "assistant" and "⚠️" not in history[-1]["content"]


def test_app_reports_a_conversation_over_the_context(app, images):
    from mlx_eve.chat_app import Tab

    tab = Tab()
    app.processor.context_length, context = 120, app.processor.context_length
    try:
        history, footer = send(app, tab, [], "What is it? " * 20, images["wide"])
    finally:
        app.processor.context_length = context
    assert "model's context is 120 tokens" in history[-1]["content"] and history[-1]["role"] == "assistant"
    history, _ = send(app, tab, history, "Hi")
    assert history[-1]["content"] and "⚠️" not in history[-1]["content"]


def test_app_stop_ends_the_answer_and_keeps_it(app, images):
    from mlx_eve.chat_app import Tab

    tab = Tab()
    history, _, pending, camera = app.submit({"text": "What is it?", "files": []}, [], tab, str(images["wide"]))
    assert pending == ("What is it?", str(images["wide"])) and camera is None  # the camera photo goes with it
    tab.stop_requested = True  # Stop, clicked before the first token arrives
    history, footer = list(app.respond(history, tab, pending, 0.0, 1.0, 50, 1.0, "", app.default_max_size))[-1]
    assert footer.endswith("*stopped*") and "Generation:** 1 tokens" in footer
    assert tab.session.messages[-1] == {"role": "assistant", "content": history[-1]["content"]}


def test_app_answers_api_calls_without_history_and_stops_them_when_closing(app, images):
    settings = (0.0, 1.0, 5, 1.0, "", app.default_max_size)
    text, stats = list(app.answer("What is it?", *settings, image=str(images["wide"])))[-1]
    # Each call starts afresh: the same answer to the same question, with the whole prompt processed.
    again, stats_again = list(app.answer("What is it?", *settings, image=str(images["wide"])))[-1]
    assert again == text and stats_again["prompt_tokens"] == stats["prompt_tokens"]
    assert stats["image_tokens"] > 0 and stats["generation_tokens"] == 5 and stats["finish_reason"] == "length"

    stream = app.answer("Tell me a long story.", 0.0, 1.0, 2000, 1.0, "", app.default_max_size)
    updates = [next(stream)]
    app.closing.set()  # as at Ctrl-C
    text, stats = (updates + list(stream))[-1]
    assert stats["generation_tokens"] < 2000 and stats["finish_reason"] is None


def test_stopping_closes_the_turn_after_the_current_token():
    from concurrent.futures import ThreadPoolExecutor

    from mlx_eve.chat_app import iterate_on

    released, closed, stop = threading.Event(), threading.Event(), threading.Event()

    def tokens():
        try:
            yield 1
            released.wait()
            yield 2
            yield 3
        finally:
            closed.set()

    seen = []
    for batch in iterate_on(ThreadPoolExecutor(1), tokens, stop.is_set):
        seen += batch
        stop.set()
        released.set()
    assert seen in ([1], [1, 2]) and closed.is_set()


def test_without_gradio_the_app_says_how_to_install_it():
    code = "import sys; sys.modules['gradio'] = None; from mlx_eve.commands.app import main; sys.exit(main([]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pip install 'mlx-eve[app]'" in result.stderr
