"""The prompt cache on disk: answers from a stored KV cache equal fresh ones, after a restart too; prefixes, the
byte bound, damaged and foreign files, interrupted writes; and ``generate --prompt-cache-file``."""

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_eve import disk_cache
from mlx_eve.disk_cache import DiskPromptCache, model_identity, save_atomically
from mlx_eve.engine import cache_key
from mlx_eve.generation import generate_from_inputs
from mlx_eve.models.base import image_spans

ROOT = Path(__file__).resolve().parent.parent
DEMO_IMAGE = ROOT / "mlx_eve" / "assets" / "images" / "shapes.png"


@pytest.fixture(scope="module")
def setup(v2_model, images):
    """The tiny EVEv2, its identity, a prompt about an image, its key and where its image ends."""
    model, processor = v2_model
    inputs = processor("What is in the image?", images=[images["wide"]])
    image_end = image_spans(inputs.input_ids)[-1][1]
    return model, processor, model_identity(model, processor), inputs, cache_key(inputs), image_end


def prefilled(model, inputs, tokens):
    """A KV cache of the first ``tokens`` prompt tokens, computed here."""
    cache = make_prompt_cache(model)
    embeddings = model.embed_inputs(inputs.input_ids, inputs.pixel_values)
    model(inputs.input_ids[None, :tokens], cache=cache, input_embeddings=embeddings[None, :tokens])
    mx.eval([c.state for c in cache])
    return cache


def answer(model, processor, inputs, **kwargs):
    responses = list(generate_from_inputs(model, processor, inputs, max_tokens=8, **kwargs))
    return [r.token for r in responses], np.array([r.logprobs[r.token].item() for r in responses])


def warnings_about(caplog, path):
    return [r for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


def test_stored_cache_gives_the_fresh_answer_after_a_restart(setup, tmp_path):
    model, processor, identity, inputs, key, image_end = setup
    fresh_tokens, fresh_logprobs = answer(model, processor, inputs)
    DiskPromptCache(tmp_path, 1 << 30, identity).store(key[:image_end], prefilled(model, inputs, image_end))
    restarted = DiskPromptCache(tmp_path, 1 << 30, identity)
    assert len(restarted) == 1
    reused, cache = restarted.fetch(key)
    assert reused == image_end
    tokens, logprobs = answer(model, processor, inputs, prompt_cache=cache, reused=reused)
    assert tokens == fresh_tokens
    np.testing.assert_allclose(logprobs, fresh_logprobs, atol=1e-4)


def test_store_later_writes_from_its_own_thread_what_the_cache_held_then(setup, tmp_path, monkeypatch):
    """The caller does not wait for the file; the cache it goes on filling does not change what is written."""
    model, processor, identity, inputs, key, image_end = setup
    fresh_tokens, fresh_logprobs = answer(model, processor, inputs)
    cache = prefilled(model, inputs, image_end + 4)
    expected = [np.array(c.state[0][..., :image_end, :]) for c in cache]
    writing, may_finish = [], threading.Event()

    def slow_save(*args, **kwargs):
        writing.append(threading.current_thread().name)
        assert may_finish.wait(30)
        return save_atomically(*args, **kwargs)

    monkeypatch.setattr(disk_cache, "save_atomically", slow_save)
    stored = DiskPromptCache(tmp_path, 1 << 30, identity)
    stored.store_later(key, cache, image_end)  # returns while the write waits
    for c in cache:  # the caller writes over the very positions the pending copy holds
        c.keys[..., :image_end, :] = mx.zeros_like(c.keys[..., :image_end, :])
        c.values[..., :image_end, :] = mx.zeros_like(c.values[..., :image_end, :])
    mx.eval([c.state for c in cache])
    stored.store_later(key, cache, image_end)  # already queued: skipped, not queued twice
    may_finish.set()
    stored.close()
    assert writing == ["mlx-eve-disk-cache"]
    reused, loaded = DiskPromptCache(tmp_path, 1 << 30, identity).fetch(key)
    assert reused == image_end
    for c, keys in zip(loaded, expected):
        np.testing.assert_array_equal(np.array(c.state[0]), keys)
    tokens, logprobs = answer(model, processor, inputs, prompt_cache=loaded, reused=reused)
    assert tokens == fresh_tokens
    np.testing.assert_allclose(logprobs, fresh_logprobs, atol=1e-4)


def test_fetch_finds_the_longest_stored_prefix(setup, tmp_path, images):
    model, processor, identity, inputs, key, image_end = setup
    cache = DiskPromptCache(tmp_path, 1 << 30, identity)
    cache.store(key[:image_end], prefilled(model, inputs, image_end))
    cache.store(key[: image_end + 3], prefilled(model, inputs, image_end + 3))
    assert cache.fetch(key)[0] == image_end + 3
    other_question = cache_key(processor("Which colours are there?", images=[images["wide"]]))
    assert (
        other_question[: image_end + 1] == key[: image_end + 1]
        and other_question[: image_end + 3] != key[: image_end + 3]
    )
    assert cache.fetch(other_question)[0] == image_end
    other_image = cache_key(processor("What is in the image?", images=[images["tall"]]))
    assert cache.fetch(other_image) is None
    assert cache.fetch(key[: image_end - 1]) is None


def test_byte_bound_evicts_the_least_recently_used(setup, tmp_path):
    model, processor, identity, inputs, key, image_end = setup
    lengths = [image_end, image_end + 1, image_end + 2]
    caches = {n: prefilled(model, inputs, n) for n in lengths}
    probe = DiskPromptCache(tmp_path / "probe", 1 << 30, identity)
    probe.store(key[: lengths[0]], caches[lengths[0]])
    one_file = probe.nbytes
    cache = DiskPromptCache(tmp_path / "bounded", int(2.5 * one_file), identity)
    cache.store(key[: lengths[0]], caches[lengths[0]])
    time.sleep(0.05)  # file times are coarser than a store
    cache.store(key[: lengths[1]], caches[lengths[1]])
    time.sleep(0.05)
    assert cache.fetch(key[: lengths[0]])[0] == lengths[0]  # now the most recently used
    time.sleep(0.05)
    cache.store(key[: lengths[2]], caches[lengths[2]])
    assert len(cache) == 2 and cache.nbytes <= 2.5 * one_file
    assert len(list((tmp_path / "bounded").glob("*.safetensors"))) == 2
    assert cache.fetch(key[: lengths[1]])[0] == lengths[0]  # the entry of lengths[1] went
    assert cache.fetch(key)[0] == lengths[2]
    small = DiskPromptCache(tmp_path / "small", one_file // 2, identity)
    small.store(key[: lengths[0]], caches[lengths[0]])
    assert len(small) == 0 and not list((tmp_path / "small").iterdir())


def damage(kind, path, setup, tmp_path):
    """Write a damaged (or foreign) file at ``path``, as an entry for ``key[:image_end + 2]`` would be named."""
    model, processor, identity, inputs, key, image_end = setup
    longer = image_end + 2
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(5000))
    elif kind == "truncated":
        save_atomically(path, prefilled(model, inputs, longer), identity, key[:longer])
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "foreign":
        save_atomically(path, prefilled(model, inputs, longer), {**identity, "model": "another"}, key[:longer])
    elif kind == "missing layer":
        save_atomically(path, prefilled(model, inputs, longer)[:-1], identity, key[:longer])
    elif kind == "wrong length":
        save_atomically(path, prefilled(model, inputs, longer - 1), identity, key[:longer])


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "foreign", "missing layer", "wrong length"])
def test_damaged_or_foreign_file_is_ignored_with_one_warning(kind, setup, tmp_path, caplog):
    model, processor, identity, inputs, key, image_end = setup
    fresh_tokens, _ = answer(model, processor, inputs)
    DiskPromptCache(tmp_path, 1 << 30, identity).store(key[:image_end], prefilled(model, inputs, image_end))
    bad = tmp_path / disk_cache._file_name(key[: image_end + 2])
    damage(kind, bad, setup, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mlx_eve.disk_cache"):
        cache = DiskPromptCache(tmp_path, 1 << 30, identity)
        for _ in range(3):
            reused, prompt_cache = cache.fetch(key)
            assert reused == image_end
            tokens, _ = answer(model, processor, inputs, prompt_cache=prompt_cache, reused=reused)
            assert tokens == fresh_tokens
        DiskPromptCache(tmp_path, 1 << 30, identity)  # a deleted file is not warned about again
    assert len(warnings_about(caplog, bad)) == (2 if kind == "foreign" else 1)
    assert bad.exists() == (kind == "foreign")  # another model's file stays for it


WRITER = """
import os, sys
from pathlib import Path
from mlx_eve import disk_cache, load
from mlx_lm.models.cache import make_prompt_cache
import mlx.core as mx

def save_half_then_die(file, cache, metadata):
    file.write(b"x" * 1000)
    file.flush()
    os._exit(9)  # killed mid-write: no clean-up runs

model, processor = load(sys.argv[1])
cache = make_prompt_cache(model)
model(mx.array([[1, 2, 3]]), cache=cache)
disk_cache.save_prompt_cache = save_half_then_die
disk_cache.DiskPromptCache(Path(sys.argv[2]), 1 << 30, {"model": "m"}).store([1, 2, 3], cache)
"""


def test_write_killed_midway_leaves_nothing_that_loads(v2_path, tmp_path, caplog):
    folder = tmp_path / "cache"
    script = textwrap.dedent(WRITER)
    result = subprocess.run([sys.executable, "-c", script, str(v2_path), str(folder)], cwd=ROOT, timeout=120)
    assert result.returncode == 9
    (left,) = folder.iterdir()
    assert left.suffix == ".tmp"
    with caplog.at_level(logging.WARNING, logger="mlx_eve.disk_cache"):
        cache = DiskPromptCache(folder, 1 << 30, {"model": "m"})
    assert len(cache) == 0 and cache.fetch([1, 2, 3, 4]) is None
    assert not list(folder.iterdir())  # the dead writer's temporary file is cleaned up
    assert not caplog.records


def test_failed_store_warns_once_and_leaves_no_file(setup, tmp_path, monkeypatch, caplog):
    model, processor, identity, inputs, key, image_end = setup

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_cache.os, "replace", disk_full)
    cache = DiskPromptCache(tmp_path, 1 << 30, identity)
    with caplog.at_level(logging.WARNING, logger="mlx_eve.disk_cache"):
        cache.store(key[:image_end], prefilled(model, inputs, image_end))
        cache.store(key[: image_end + 1], prefilled(model, inputs, image_end + 1))
    assert len(warnings_about(caplog, tmp_path)) == 1 and "No space left" in caplog.records[0].getMessage()
    assert not list(tmp_path.iterdir()) and cache.fetch(key) is None


def generate(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_eve.generate", "-m", "12", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def answer_text(stdout):
    return stdout.split("==========")[0]


def test_cli_prompt_cache_file_is_saved_then_reused(tmp_path, images):
    file = tmp_path / "shapes.safetensors"
    question = ["--image", str(DEMO_IMAGE), "-p", "What shape is the green object?"]
    first = generate(*question, "--prompt-cache-file", str(file))
    assert first.returncode == 0, first.stderr
    assert "tokens saved to" in first.stdout and file.is_file()
    plain = generate(*question)
    second = generate(*question, "--prompt-cache-file", str(file))
    assert second.returncode == 0, second.stderr
    assert answer_text(second.stdout) == answer_text(first.stdout) == answer_text(plain.stdout)
    assert "tokens read from" in second.stdout and "[WARNING]" not in second.stderr


def test_cli_prompt_cache_file_of_another_prompt_or_damaged_is_made_again(tmp_path, images):
    file = tmp_path / "shapes.safetensors"
    question = ["--image", str(DEMO_IMAGE), "-p", "What shape is the green object?"]
    first = generate(*question, "--prompt-cache-file", str(file))
    assert first.returncode == 0, first.stderr
    other = generate("--image", str(images["wide"]), "-p", "What is it?", "--prompt-cache-file", str(file))
    assert other.returncode == 0, other.stderr
    assert "another prompt" in other.stderr and "tokens saved to" in other.stdout
    file.write_bytes(b"not a cache")
    damaged = generate(*question, "--prompt-cache-file", str(file))
    assert damaged.returncode == 0, damaged.stderr
    assert damaged.stderr.count("[WARNING]") == 1 and answer_text(damaged.stdout) == answer_text(first.stdout)


@pytest.mark.parametrize(
    "value, message",
    [(".", "is a folder"), ("no/such/folder/c.safetensors", "no such folder"), ("cache.bin", "end in .safetensors")],
)
def test_cli_refuses_a_bad_prompt_cache_file(value, message):
    result = generate("-p", "Hi", "--prompt-cache-file", value)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_cli_refuses_prompt_cache_file_with_kv_bits(tmp_path):
    result = generate("-p", "Hi", "--prompt-cache-file", str(tmp_path / "c.safetensors"), "--kv-bits", "4")
    assert result.returncode == 1 and result.stderr.startswith("error: --prompt-cache-file")


def test_a_restarted_server_reuses_the_image_prefix_on_disk(tmp_path):
    """``--prompt-cache-dir``: a question about an image after a restart skips the image's prefill (its tokens are
    cached) and gets the answer a server without the folder gives; a corrupt file in the folder is ignored."""
    import base64

    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from bundled_image import IMAGE
    from processes import start_server, stop_server

    from mlx_eve.demo import BUNDLED_MODEL

    folder = tmp_path / "kv"
    url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()

    def ask(server, question):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        answer = client.chat.completions.create(
            messages=[{"role": "user", "content": content}], max_tokens=8, model="eve-shapes"
        )
        return answer.choices[0].message.content, answer.usage

    def served(*options):
        return start_server(BUNDLED_MODEL, tmp_path / f"server{len(list(tmp_path.iterdir()))}.log", *options)

    plain = served()
    try:
        expected = ask(plain, "What colour is the circle?")[0]
    finally:
        stop_server(plain)
    first = served("--prompt-cache-dir", str(folder))
    try:
        _, usage = ask(first, "How many shapes are there?")
        assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens_details.image_tokens  # the warm-up's
    finally:
        stop_server(first)
    assert len(list(folder.glob("*.safetensors"))) == 1
    (folder / ("0" * 64 + ".safetensors")).write_bytes(b"not a prompt cache")
    again = served("--prompt-cache-dir", str(folder))
    try:
        answer, usage = ask(again, "What colour is the circle?")
        assert answer == expected
        assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens_details.image_tokens > 0
    finally:
        stop_server(again)
    assert "is deleted" in again.log.read_text()
