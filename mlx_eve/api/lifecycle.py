"""The server process: load the model, warm it up, serve HTTP with uvicorn until Ctrl-C, then stop the answers in
progress and the engine. Under ``mlx.launch`` every process runs ``serve`` with its part of the model: rank 0
serves HTTP, the others run its engine's rounds."""

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Tuple

import mlx.core as mx
import uvicorn
from uvicorn.logging import DefaultFormatter

from ..disk_cache import DiskPromptCache, model_identity
from ..engine import Engine
from ..errors import EVEError
from ..loading import load
from ..models.base import EVEModel
from ..processor import Processor
from ..request import SamplingParams
from .app import create_app
from .serving import ServerSettings

# The model name mlx-lm's server answers to whatever it serves; clients written for it send it.
DEFAULT_MODEL_NAME = "default_model"
# On Ctrl-C, how long uvicorn waits for requests that are not yet answers (an image download...) before
# cancelling them; answers in progress end at once.
SHUTDOWN_GRACE_S = 5.0


def serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until Ctrl-C (``KeyboardInterrupt``); on ranks other than 0, follow rank 0."""
    group = mx.distributed.init()
    if group.rank() > 0:
        follow_rank_0(args, group)
        return
    # Before loading: a port in use is known at once.
    with listen(args.host, args.port) as sock:
        print(f"Loading {args.model} …", flush=True)
        start = time.perf_counter()
        model, processor = load_model(args, group)
        print(f"Loaded in {time.perf_counter() - start:.1f} s.", flush=True)
        if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it.",
                file=sys.stderr,
            )
        log_to_terminal()
        engine = make_engine(model, processor, args, group)
        try:
            serve_http(engine, processor, settings_of(args), args, sock, group)
        finally:
            engine.close()  # with several processes, this also stops the others


def serve_http(
    engine: Engine,
    processor: Processor,
    settings: ServerSettings,
    args: argparse.Namespace,
    sock: socket.socket,
    group: mx.distributed.Group,
) -> None:
    """The app on ``sock`` until Ctrl-C, which ends the answers in progress; uvicorn then closes the connections
    and raises ``KeyboardInterrupt``."""
    # One token before serving: the first answer would otherwise pay for the lazy start of the tokenizer
    # and the compute backend, and a Ctrl-C during that start was seen to be lost.
    list(engine.submit("Hi", params=SamplingParams(max_tokens=1)))
    app = create_app(engine, processor, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    host = f"[{args.host}]" if ":" in args.host else args.host
    processes = f" on {group.size()} processes" if group.size() > 1 else ""
    print(f"Serving {settings.model_id}{processes} at http://{host}:{args.port}/v1 (Ctrl-C to quit)", flush=True)
    server = StoppableServer(config, app.state.stop_answers)
    threading.Thread(target=stop_with, args=(engine, server), name="mlx-eve-watch", daemon=True).start()
    server.run(sockets=[sock])
    if engine.failure is not None:
        raise EVEError(f"The server stopped because its engine did: {engine.failure!r}")


def stop_with(engine: Engine, server: "StoppableServer") -> None:
    """Stop ``server`` should ``engine`` stop on an error: a server that can no longer answer exits (non-zero, so
    that a supervisor restarts it) rather than hang."""
    try:
        engine.join()
    except EVEError:
        server.stop()


def settings_of(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        model_id=model_name(args.model),
        aliases=(args.model, DEFAULT_MODEL_NAME),
        api_key=args.api_key,
        allow_local_images=args.allow_local_images,
        allow_image_urls=not args.no_image_urls,
        keep_image_positions=args.keep_image_positions,
        max_body_bytes=args.max_body_bytes,
        adapters=() if args.adapter_path is None else (args.adapter_path,),
        max_image_bytes=args.max_image_bytes,
        image_timeout=args.image_timeout,
    )


def log_to_terminal() -> None:
    """The library's log lines (one per answer, cancellations, errors) on the terminal, as uvicorn prints its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    logger = logging.getLogger("mlx_eve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def model_name(model_path: str) -> str:
    """The served model's name: a local folder's name, or the Hugging Face repo id."""
    return Path(model_path).name if Path(model_path).is_dir() else model_path


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, made as uvicorn makes it, or one ``EVEError`` line (uvicorn would log and exit)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise EVEError(f"Could not listen on {host}, port {port}: {reason}. Choose another --port or --host.") from e


class StoppableServer(uvicorn.Server):
    """uvicorn's server, which also calls ``on_exit`` on its event loop when a signal (Ctrl-C) asks it to stop."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()  # uvicorn listens to signals only while this runs
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self.loop.call_soon_threadsafe(self.on_exit)

    def stop(self) -> None:
        """Stop serving, from any thread, as a signal would."""
        self.should_exit = True
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(self.on_exit)


def follow_rank_0(args: argparse.Namespace, group: mx.distributed.Group) -> None:
    """A rank other than 0: its part of the model, running rank 0's engine rounds until rank 0 closes it."""
    # Ctrl-C in a terminal reaches every process of the group; rank 0 stops them all. Leaving at once instead
    # would strand rank 0 in the middle of a step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    model, processor = load_model(args, group)
    make_engine(model, processor, args, group).join()


def load_model(args: argparse.Namespace, group: mx.distributed.Group) -> Tuple[EVEModel, Processor]:
    return load(args.model, adapter_path=args.adapter_path, max_size=args.max_size, group=group)


def make_engine(model: EVEModel, processor: Processor, args: argparse.Namespace, group: mx.distributed.Group) -> Engine:
    """The same engine on every rank: they must batch, and keep KV caches, alike."""
    disk_cache = None
    if args.prompt_cache_dir is not None:
        identity = model_identity(model, processor, args.adapter_path)
        disk_cache = DiskPromptCache(args.prompt_cache_dir, args.prompt_cache_dir_bytes, identity)
    engine = Engine(
        model,
        processor,
        max_batch_size=args.max_batch_size,
        max_queued=args.max_queued,
        prompt_cache_bytes=args.prompt_cache_bytes,
        disk_cache=disk_cache,
        max_memory=args.max_memory,
        group=group,
    )
    mx.set_memory_limit(engine.memory.limit)  # MLX frees its buffer cache, or waits, before it goes beyond
    return engine
