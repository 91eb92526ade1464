"""The benchmarks: a tiny end-to-end run, the mlx-lm baseline's shared weights, and the reference blend it times
our split layers against (which must compute the same thing); the serving benchmark's two servers on the same
tokens. No timing is asserted."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serving  # noqa: E402
import speed as benchmark  # noqa: E402

from mlx_eve.image_processing import AnyPixelProcessor, AnyRatioProcessor
from mlx_eve.models import IMAGE_TOKEN_ID


def test_tiny_run_reports_every_measurement(tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--shapes", "v2-tiny", "v1-tiny", "--bits", "0", "4", "--group-size", "32", "--context-lengths", "8",
            "32", "--decode-tokens", "2", "--repeats", "2", "--no-bandwidth", "--json", str(out)]  # fmt: skip
    assert benchmark.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    runs = [("v2-tiny", 0), ("v2-tiny", 4), ("v1-tiny", 0), ("v1-tiny", 4)]
    assert [(r["shape"], r["bits"]) for r in results] == runs
    for r in results:
        assert r["lm_weight_bytes"] < r["eve_weight_bytes"] and r["decode_weight_bytes"] <= r["lm_weight_bytes"]
        sizes = benchmark.SHAPES[r["shape"]].image_sizes
        assert [p["image_size"] for p in r["prefill"]] == list(sizes)
        for p in r["prefill"]:
            extra_text = benchmark.TEXT_TOKENS_BEFORE_IMAGE + benchmark.TEXT_TOKENS_AFTER_IMAGE
            assert p["prompt_tokens"] == p["image_tokens"] + extra_text
            assert p["eve_s"] > 0 and p["lm_s"] > 0 and p["patch_s"] > 0
            assert p["ratio"] == pytest.approx(p["lm_s"] / p["eve_s"]) and p["median_ratio"] > 0
            assert p["kv_bytes"] > 0 and p["eve_peak_bytes"] >= p["kv_bytes"]
            assert (p["blend_speedup"] is not None) == (r["shape"] == "v2-tiny")
        assert [d["context"] for d in r["decode"]] == [8, 32]
        assert all(d["eve_tps"] > 0 and d["lm_tps"] > 0 for d in r["decode"])
        assert r["memory_ratio"]["eve"] >= 1 and r["memory_ratio"]["mlx_lm"] >= 1
        assert len(r["targets"]) == (5 if r["shape"] == "v2-tiny" else 4)
    assert printed.count("Targets:") == 4 and "| 64² | 7 / 59 |" in printed
    assert printed.count("the targets are set for the real shapes") == 4


def test_decode_is_set_against_the_measured_bandwidth():
    probe = benchmark.bandwidth_matrix(1 << 22)
    rates = benchmark.measure_bandwidth(probe, repeats=2)
    assert set(rates) == {"reduction", "copy", "matrix-vector"} and all(v > 0 for v in rates.values())
    result = benchmark.benchmark(
        "v2-tiny", image_sizes=[], context_lengths=[8], decode_tokens=2, repeats=1, warmup=0, probe=probe,
        log=lambda _: None,
    )  # fmt: skip
    assert not result.prefill and result.decode[0].bandwidth > 0
    row = benchmark.report([result], rates).split("\n| 8 |")[1].split("\n")[0]
    assert "–" not in row and len(row.split("|")) == 10


@pytest.mark.parametrize("shape,bits", [("v2-tiny", 0), ("v1-tiny", 0), ("v2-tiny", 4)])
def test_the_mlx_lm_baseline_holds_the_eve_text_weights_themselves(shape, bits):
    eve, lm = benchmark.build_models(benchmark.shape_config(shape), bits=bits, group_size=32)
    eve_params = dict(tree_flatten(eve.parameters()))
    lm_params = dict(tree_flatten(lm.parameters()))
    assert lm_params.keys() == dict(benchmark.text_weights(eve)).keys()
    assert all(v is eve_params[k] for k, v in lm_params.items())
    ids = mx.array([[3, 17, 42, 5, 99, 7]])
    np.testing.assert_allclose(np.asarray(eve(ids)), np.asarray(lm(ids)), atol=1e-5)


def _two_image_batch(rng, dims):
    """Two prompts of equal length with different layouts: text/image/text/image/text and image/text/image."""
    ids = rng.integers(0, 200, (2, 30))
    ids[0, 3:10] = ids[0, 14:21] = IMAGE_TOKEN_ID
    ids[1, :7] = ids[1, 23:] = IMAGE_TOKEN_ID
    return mx.array(ids), mx.array(rng.normal(size=(2, 30, dims)).astype(np.float32))


def test_the_reference_blend_computes_what_the_split_layers_compute():
    config = benchmark.shape_config("v2-tiny")
    eve, lm = benchmark.build_models(config)  # random text and visual copies: a routing mistake shows
    ids, embeddings = _two_image_batch(np.random.default_rng(0), config["hidden_size"])
    split = np.asarray(eve(ids, input_embeddings=embeddings))
    blend = np.asarray(benchmark.ReferenceBlend(eve)(ids, input_embeddings=embeddings))
    np.testing.assert_allclose(split, blend, atol=1e-4)
    assert np.abs(split - np.asarray(lm(ids, input_embeddings=embeddings))).max() > 1e-2

    # In cached chunks that cut through the image runs, and on to a decode step.
    logits = {}
    for name, model in (("split", eve), ("blend", benchmark.ReferenceBlend(eve))):
        cache = make_prompt_cache(model)
        chunks = [model(ids[:, a:b], cache, embeddings[:, a:b]) for a, b in ((0, 12), (12, 25), (25, 30))]
        step = model(mx.array([[5], [6]]), cache)
        logits[name] = np.asarray(mx.concatenate([*chunks, step], axis=1))
    np.testing.assert_allclose(logits["split"][:, :30], split, atol=1e-4)
    np.testing.assert_allclose(logits["split"], logits["blend"], atol=1e-4)


def test_image_prompts_have_the_processors_token_counts():
    v2 = AnyRatioProcessor(max_size=1600)
    assert benchmark.image_tokens(1600, benchmark.token_stride(benchmark.SHAPES["v2-7b"].config)) == v2.num_tokens(
        1600, 1600
    )
    v1 = AnyPixelProcessor(image_size=1344)
    assert benchmark.image_tokens(1344, benchmark.token_stride(benchmark.SHAPES["v1-7b"].config)) == v1.num_tokens(
        900, 900
    )
    ids = np.asarray(benchmark.image_prompt(7, 250, np.random.default_rng(0)))
    before, after = benchmark.TEXT_TOKENS_BEFORE_IMAGE, benchmark.TEXT_TOKENS_AFTER_IMAGE
    assert (ids[before : before + 7] == IMAGE_TOKEN_ID).all()
    assert (ids[:before] >= 0).all() and (ids[-after:] >= 0).all() and ids.size == before + 7 + after


def test_depth_extrapolation_of_patch_share_and_memory():
    prefill = benchmark.PrefillResult(
        1600, 2551, 2603, patch_s=1.0, eve_s=4.0, lm_s=4.0, median_ratio=1.0, eve_peak_bytes=150, lm_peak_bytes=150,
        kv_bytes=50,
    )  # fmt: skip
    full = benchmark.Result("v2-0.5b", "float32", 0, 24, 24, 1000, 600, 700, 300, 500, prefill=[prefill])
    assert full.patch_share(prefill) == pytest.approx(1 / 5)
    assert full.memory_ratio("eve") == pytest.approx((1000 + 150) / (1000 + 50))
    # 4 of 24 layers: 6x the prefill time, layer weights and KV cache; the same activations (100 bytes).
    cut = benchmark.Result("v2-0.5b", "float32", 0, 4, 24, 1000, 600, 700, 300, 500, prefill=[prefill])
    assert cut.patch_share(prefill) == pytest.approx(1 / 25)
    assert cut.memory_ratio("eve") == pytest.approx((4000 + 100 + 300) / (4000 + 300))
    assert cut.memory_ratio("lm") == pytest.approx((2200 + 100 + 300) / (2200 + 300))


def test_serving_benchmark_runs_both_servers_on_the_same_tokens(tmp_path, capsys):
    out = tmp_path / "serving.json"
    argv = ["--shape", "v2-tiny", "--streams", "1", "2", "--image-streams", "2", "--image-size", "64",
            "--prompt-tokens", "20", "--max-tokens", "6", "--work-dir", str(tmp_path / "models"),
            "--json", str(out)]  # fmt: skip
    assert serving.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    eve, lm = results["text"]["mlx-eve"], results["text"]["mlx-lm"]
    assert list(eve) == list(lm) == ["1", "2"] and list(results["image"]) == ["2"]
    for n in ("1", "2"):
        assert eve[n]["tokens"] == lm[n]["tokens"] == [6] * int(n)
        assert eve[n]["prompt_tokens"] == lm[n]["prompt_tokens"] and len(set(eve[n]["prompt_tokens"])) == 1
        assert eve[n]["aggregate_tps"] > 0 and lm[n]["decode_tps"] > 0 and eve[n]["ttft_spread"] >= 0
    # A 64² image is 7 embeddings; the "\n" after it and the space before it are tokens of their own.
    image_tokens = benchmark.image_tokens(64, benchmark.token_stride(benchmark.SHAPES["v2-tiny"].config))
    assert results["image"]["2"]["prompt_tokens"] == [eve["1"]["prompt_tokens"][0] + image_tokens + 2] * 2
    assert results["token_count_problems"] == [] and "the same on both sides, every answer full" in printed
    assert printed.count("| 2 | mlx-eve |") == 2 and "| 2 | mlx-lm |" in printed and "mlx-eve ÷ mlx-lm" in printed


def test_the_serving_benchmarks_mlx_lm_folder_holds_the_eve_text_weights(tmp_path):
    built = serving.write_folders("v2-tiny", None, "float32", 64, tmp_path)
    eve = mx.load(str(tmp_path / "eve" / "model.safetensors"))
    lm = mx.load(str(tmp_path / "mlx-lm" / "model.safetensors"))
    assert any(".moe_" in k for k in eve) and not any(".moe_" in k or "vision_tower" in k for k in lm)
    assert lm.keys() < eve.keys() and all(mx.array_equal(lm[k], eve[k]).item() for k in lm)
    vocab = built["config"]["vocab_size"]
    assert built["tokenizer"].get_vocab_size() == vocab == eve["model.embed_tokens.weight"].shape[0]
    # Every id the model can pick is text.
    assert all(built["tokenizer"].decode([i], skip_special_tokens=False) for i in range(vocab))
    text = serving.prompt_text(built["tokenizer"], 37, np.random.default_rng(1))
    assert len(built["tokenizer"].encode(text).ids) == 37


def test_the_serving_benchmark_refuses_a_bad_option_in_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        serving.main(["--streams", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: argument --streams: expected an integer >= 1, got '0'\n"
