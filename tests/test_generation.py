"""Generation through mlx-lm: chunked prefill, KV cache, samplers, stop tokens, vocabulary limit, context."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_eve import generate, load, stream_generate
from mlx_eve.errors import PromptTooLongError
from mlx_eve.models import IMAGE_TOKEN_ID


def greedy(model, processor, prompt, image, max_tokens=8, **kwargs):
    responses = list(stream_generate(model, processor, prompt, image=image, max_tokens=max_tokens, **kwargs))
    tokens = [r.token for r in responses]
    logprobs = np.array([r.logprobs[r.token].item() for r in responses])
    return tokens, logprobs, responses


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_chunked_prefill_equals_single_prefill(family, v1_model, v2_model, images):
    model, processor = v1_model if family == "v1" else v2_model
    inputs = processor("What is in the image?", images=[images["wide"]])
    ids = np.asarray(inputs.input_ids)
    first_image = int(np.argmax(ids == IMAGE_TOKEN_ID))
    assert first_image > 0 and inputs.image_tokens > 40
    whole = greedy(model, processor, "What is in the image?", images["wide"], prefill_step_size=4096)
    # Step 19 puts chunk boundaries inside the image run, and some chunks hold only image tokens.
    chunked = greedy(model, processor, "What is in the image?", images["wide"], prefill_step_size=19)
    assert whole[0] == chunked[0]
    np.testing.assert_allclose(whole[1], chunked[1], atol=1e-4)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_cached_decode_equals_full_recomputation(family, v1_model, v2_model, images):
    model, processor = v1_model if family == "v1" else v2_model
    tokens, logprobs, _ = greedy(model, processor, "Describe it.", images["tall"], max_tokens=6)
    inputs = processor("Describe it.", images=[images["tall"]])
    prompt = model.embed_inputs(inputs.input_ids, inputs.pixel_values)
    generated = model.model.embed_tokens(mx.array(tokens[:-1]))
    ids = mx.concatenate([inputs.input_ids, mx.array(tokens[:-1], dtype=mx.int32)])
    logits = model(ids[None], input_embeddings=mx.concatenate([prompt, generated])[None])[0]
    n = inputs.input_ids.size
    full = logits[n - 1 :] - mx.logsumexp(logits[n - 1 :], axis=-1, keepdims=True)
    assert np.argmax(np.asarray(full), -1).tolist() == tokens
    np.testing.assert_allclose(np.asarray(full)[np.arange(len(tokens)), tokens], logprobs, atol=1e-4)


def test_responses_carry_mlx_lm_fields(v2_model, images):
    model, processor = v2_model
    tokens, _, responses = greedy(model, processor, "What is this?", images["square"], max_tokens=5)
    prompt_tokens = processor("What is this?", images=[images["square"]]).input_ids.size
    for i, r in enumerate(responses):
        assert r.prompt_tokens == prompt_tokens and r.image_tokens == processor.image_processor.num_tokens(57, 57)
        assert r.generation_tokens == i + 1 and r.prompt_tps > 0 and r.generation_tps > 0 and r.peak_memory > 0
        assert r.logprobs.shape == (model.vocab_limit,) and isinstance(r.text, str)
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]
    text = generate(model, processor, "What is this?", images["square"], max_tokens=5)
    assert text == "".join(r.text for r in responses)
    assert text == processor.tokenizer.decode(tokens)


def test_text_only_and_multi_turn_prompts(v1_model):
    model, processor = v1_model
    conversation = [
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "How many shapes?\nBe brief."},
    ]
    responses = list(stream_generate(model, processor, conversation, max_tokens=3, system_prompt="Short answers."))
    assert len(responses) == 3 and responses[-1].image_tokens == 0
    assert processor(conversation, system_prompt="Short answers.").prompt.startswith("Short answers. USER: Hello?")


@pytest.mark.parametrize("family,stops", [("v1", ["</s>"]), ("v2", ["<|im_end|>", "<|endoftext|>"])])
def test_generation_stops_at_the_template_stop_tokens(family, stops, v1_model, v2_model):
    model, processor = v1_model if family == "v1" else v2_model
    for stop in stops:
        stop_id = processor.tokenizer.convert_tokens_to_ids(stop)

        processor_len = processor("Go.").input_ids.size

        def force_stop(tokens, logits, stop_id=stop_id, processor_len=processor_len):
            return logits + 1000.0 * (mx.arange(logits.shape[-1]) == stop_id) * (tokens.size >= processor_len + 2)

        responses = list(stream_generate(model, processor, "Go.", max_tokens=20, logits_processors=[force_stop]))
        assert responses[-1].finish_reason == "stop" and len(responses) == 3
        assert stop not in "".join(r.text for r in responses)


def test_logits_beyond_the_tokenizer_are_never_sampled(v2_path):
    model, processor = load(str(v2_path))
    limit = model.vocab_limit
    assert limit == len(processor.tokenizer) < model.args.vocab_size
    model.lm_head.weight = mx.concatenate([model.lm_head.weight[:limit], 100 * model.lm_head.weight[limit:]])
    out = model(processor("Hi").input_ids[None])
    assert out.shape[-1] == limit
    for temp in (0.0, 1.5):
        mx.random.seed(0)
        tokens = [r.token for r in stream_generate(model, processor, "Hi", max_tokens=10, temp=temp)]
        assert max(tokens) < limit


def test_samplers_and_penalties(v2_model, images):
    model, processor = v2_model
    greedy_tokens = greedy(model, processor, "Hi", images["wide"])[0]
    assert greedy(model, processor, "Hi", images["wide"], temp=1.0, top_k=1)[0] == greedy_tokens
    runs = []
    for _ in range(2):
        mx.random.seed(3)
        runs.append(greedy(model, processor, "Hi", images["wide"], temp=1.0, top_p=0.9, min_p=0.05)[0])
    assert runs[0] == runs[1]
    seen = []

    def record(tokens, logits):
        seen.append(np.asarray(tokens))
        return logits

    greedy(model, processor, "Hi", images["wide"], repetition_penalty=1.3, logits_processors=[record])
    assert seen and all((s != IMAGE_TOKEN_ID).all() for s in seen)  # penalties see text, not placeholders


def test_quantized_and_rotating_kv_cache(v2_model, images):
    model, processor = v2_model
    plain = greedy(model, processor, "Hi", images["wide"], max_tokens=4)[0]
    quantized = greedy(
        model, processor, "Hi", images["wide"], max_tokens=4, kv_bits=8, kv_group_size=32, quantized_kv_start=0
    )
    assert quantized[0][0] == plain[0] and len(quantized[0]) == 4
    rotating = greedy(model, processor, "Hi", images["wide"], max_tokens=4, max_kv_size=4096)
    assert rotating[0] == plain


def test_prompt_longer_than_the_context_is_a_clear_error(v2_path, images):
    model, processor = load(str(v2_path))
    n = processor("Hi").input_ids.size
    processor.context_length = n + 10
    with pytest.raises(PromptTooLongError, match=f"context is {n + 10} tokens"):
        processor("What is in the image?", images=[images["wide"]])
    with pytest.raises(PromptTooLongError):
        list(stream_generate(model, processor, "word " * 100))
    # Generation stops at the end of the context instead of running past it.
    assert len(list(stream_generate(model, processor, "Hi", max_tokens=500))) == 10
