"""The desktop chat demo (``python app.py``, ``mlx_eve.commands.app``): a Gradio page around one loaded model.

The model is loaded once, before the server starts, and serves every browser tab. Each tab holds its own
``ChatSession`` (the conversation and its KV cache), so a follow-up question only runs its new tokens.
Programs ask one question at a time through the API endpoint ``/answer`` (``ChatApp.answer``).
All MLX work happens on one thread, one answer at a time; other requests wait in Gradio's queue.
Ctrl-C stops the answer being generated after its current token and exits with code 130.
"""

import argparse
import queue
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import gradio as gr
import mlx.core as mx

from .chat import ChatResponse, ChatSession
from .demo import EXAMPLE_IMAGES
from .errors import EVEError, ImageError
from .loading import load
from .models.base import EVEModel
from .processor import Processor
from .prompts import DESCRIBE

EXAMPLE_QUESTIONS = {
    # What the bundled demo model (trained on examples/shapes) was taught to answer.
    "shapes.png": [
        "How many shapes are there?",
        "What colour is the circle?",
        "Is the red circle on the left or on the right?",
    ],
}
TEXT_EXAMPLE = "Hello! What can you help me with?"
NO_STATS = "Statistics of the last answer appear here."
# System fonts only: the page must not wait for a font server when offline.
FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]

Message = Dict[str, object]
Pending = Optional[Tuple[str, Optional[str]]]  # (question, image path) handed from `submit` to `respond`


@dataclass
class Tab:
    """What one browser tab keeps between events."""

    session: Optional[ChatSession] = None
    stop_requested: bool = False


class _StartedOver:
    """Handed out by a turn that replaced a conversation because a new image came."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def iterate_on(
    executor: ThreadPoolExecutor, make_items: Callable[[], Iterator], should_stop: Callable[[], bool]
) -> Iterator[list]:
    """Run the generator ``make_items()`` on ``executor``'s thread and hand its items over to this one.

    Yields lists: every item produced since the last hand-over, so a consumer slower than the model (the
    page re-rendering the chat) gets several tokens at once instead of falling behind. Once
    ``should_stop()`` is true, or this generator is closed (a cancelled event, a closed tab), the producer
    closes ``make_items()`` after its current item, so a chat turn ends cleanly with its partial answer.
    Errors are re-raised here.
    """
    items: "queue.Queue" = queue.Queue()
    abandoned = threading.Event()

    def produce() -> None:
        try:
            with closing(make_items()) as source:
                for item in source:
                    items.put(item)
                    if should_stop() or abandoned.is_set():
                        break
        except BaseException as e:
            items.put(_Failure(e))
        finally:
            items.put(_DONE)

    executor.submit(produce)
    try:
        while True:
            batch = [items.get()]
            while not items.empty():
                batch.append(items.get())
            ready = [item for item in batch if item is not _DONE and not isinstance(item, _Failure)]
            if ready:
                yield ready
            for item in batch:
                if isinstance(item, _Failure):
                    raise item.error
            if batch[-1] is _DONE:
                return
    finally:
        abandoned.set()


def format_stats(response: ChatResponse, note: str = "") -> str:
    """The footer: the size and speed of the last answer, and how much of its prompt the KV cache held."""
    total = response.prompt_tokens + response.reused_tokens
    if not response.image_tokens:
        image = "none"
    elif response.new_image_tokens:
        image = f"{response.image_tokens} (processed)"
    else:
        image = f"{response.image_tokens} (reused from cache)"
    parts = [
        f"**Image tokens:** {image}",
        f"**Prompt tokens:** {total} ({response.prompt_tokens} processed, {response.reused_tokens} reused from cache)",
        f"**Prompt:** {response.prompt_tps:.1f} tokens/s",
        f"**Generation:** {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s",
        f"**Peak memory:** {response.peak_memory:.3f} GB",
    ]
    return " · ".join(parts) + (f" · *{note}*" if note else "")


def statistics(response: ChatResponse) -> Dict[str, object]:
    """An API answer's statistics: its size, speeds (tokens/s) and peak memory (GB), and why it ended ("stop",
    "length"; None while it is being generated)."""
    return {
        "prompt_tokens": response.prompt_tokens,
        "image_tokens": response.image_tokens,
        "generation_tokens": response.generation_tokens,
        "prompt_tps": response.prompt_tps,
        "generation_tps": response.generation_tps,
        "peak_memory": response.peak_memory,
        "finish_reason": response.finish_reason,
    }


def describe_error(error: BaseException, image: Optional[str]) -> str:
    """What went wrong with an answer, for the user; an unexpected error also prints its traceback here.
    An unreadable ``image`` is named as the user knows it, not by its upload path."""
    if not isinstance(error, (EVEError, ValueError)):
        traceback.print_exception(error)
        return f"Something went wrong: {type(error).__name__}: {error}"
    if isinstance(error, ImageError) and image is not None:
        return str(error).replace(image, Path(image).name)
    return str(error)


class ChatApp:
    """The event handlers, around one loaded model. Gradio is only needed by ``build`` and ``answer``."""

    def __init__(self, model: EVEModel, processor: Processor, model_name: str, adapters: Optional[str] = None):
        self.model = model
        self.processor = processor
        self.model_name = model_name
        self.adapters = adapters
        self.default_max_size: Optional[int] = getattr(processor.image_processor, "max_size", None)
        self.mlx_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self.closing = threading.Event()

    def loaded(self, code: str = "") -> str:
        """What is loaded: the model, its family and the adapters, with names in ``code`` quotes."""
        text = f"{code}{self.model_name}{code} ({self.model.family.name})"
        return text + (f" with adapters {code}{self.adapters}{code}" if self.adapters else "")

    def new_session(self, image: Optional[str]) -> ChatSession:
        return ChatSession(self.model, self.processor, image)

    def close(self) -> None:
        """End running answers after their current token and stop the MLX thread. The thread must free its
        MLX streams itself, or the process can abort at exit ("terminate called without an active exception",
        ml-explore/mlx#4327)."""
        self.closing.set()
        self.mlx_thread.submit(mx.clear_streams).result()
        self.mlx_thread.shutdown()

    def run(self, turn: Callable[[], Iterator], should_stop: Callable[[], bool] = lambda: False) -> Iterator[list]:
        """``iterate_on`` the MLX thread: one answer at a time, each ended early by ``should_stop`` or ``close``."""
        return iterate_on(self.mlx_thread, turn, lambda: self.closing.is_set() or should_stop())

    def options(
        self,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repetition_penalty: float,
        system_prompt: Optional[str],
        max_size: float,
    ) -> dict:
        """``ChatSession.stream``'s keyword arguments for the settings (the page's, or an API call's)."""
        return dict(
            max_tokens=int(max_tokens),
            temp=float(temperature),
            top_p=float(top_p),
            repetition_penalty=None if repetition_penalty == 1 else float(repetition_penalty),
            system_prompt=(system_prompt or "").strip() or None,
            max_size=None if self.default_max_size is None else int(max_size),
        )

    def submit(self, message: dict, history: List[Message], tab: Tab, camera: Optional[str]) -> tuple:
        """Show the user's message at once (not queued); ``respond`` answers it."""
        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files") or []
        image = files[-1] if files else camera
        if not text and image is None:
            return history, gr.MultimodalTextbox(), None, camera
        tab.stop_requested = False
        if image is not None:
            history = history + [{"role": "user", "content": {"path": image}}]
        history = history + [{"role": "user", "content": text or DESCRIBE}]
        return history, gr.MultimodalTextbox(value=None, interactive=False), (text or DESCRIBE, image), None

    def respond(
        self,
        history: List[Message],
        tab: Tab,
        pending: Pending,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repetition_penalty: float,
        system_prompt: str,
        max_size: float,
    ) -> Iterator[Tuple[List[Message], str]]:
        """Stream the answer to the pending message into the chat, with live statistics in the footer."""
        if pending is None:
            return
        question, image = pending
        answer = {"role": "assistant", "content": ""}
        history = history + [answer]
        footer = "Reading the image…" if image else "Processing the prompt…"
        yield history, footer
        options = self.options(temperature, top_p, max_tokens, repetition_penalty, system_prompt, max_size)

        def turn() -> Iterator:
            if image is not None or tab.session is None:
                session = self.new_session(image)
                if tab.session is not None and tab.session.messages:
                    yield _StartedOver()
                tab.session = session
            yield from tab.session.stream(question, **options)

        response = None
        try:
            for batch in self.run(turn, lambda: tab.stop_requested):
                for item in batch:
                    if isinstance(item, _StartedOver):
                        # Before the new image's message (and the question after it).
                        history.insert(len(history) - 3, new_conversation_marker())
                    else:
                        response = item
                        answer["content"] += response.text
                        footer = format_stats(response)
                yield history, footer
        except Exception as e:
            message = f"⚠️ {describe_error(e, image)}"
            if isinstance(e, ImageError):
                # Show no broken picture.
                history[len(history) - 3] = {"role": "user", "content": f"📎 {Path(image).name}"}
            answer["content"] = (answer["content"] + "\n\n" if answer["content"] else "") + message
            yield history, NO_STATS if response is None else footer
            return
        if response is None:
            yield history, NO_STATS
        elif tab.stop_requested:
            yield history, format_stats(response, "stopped")
        elif response.finish_reason == "length":
            yield history, format_stats(response, "reached the maximum number of tokens")

    def answer(
        self,
        question: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repetition_penalty: float,
        system_prompt: str,
        max_size: float,
        image: Optional[str] = None,
    ) -> Iterator[Tuple[str, Dict[str, object]]]:
        """Answer one question about an image (or about nothing), without a conversation before it.

        Yields the answer so far and its statistics; the last pair is the whole answer. Without a question, the
        image is described. The settings are the page's (Settings), with the same defaults and limits.
        """
        question = (question or "").strip()
        if not question and image is None:
            raise gr.Error("Ask a question, or give an image to describe.", print_exception=False)
        options = self.options(temperature, top_p, max_tokens, repetition_penalty, system_prompt, max_size)

        def turn() -> Iterator[ChatResponse]:
            return self.new_session(image).stream(question or DESCRIBE, **options)

        text = ""
        try:
            for batch in self.run(turn):
                text += "".join(response.text for response in batch)
                yield text, statistics(batch[-1])
        except Exception as e:
            # Reported to the caller; describe_error prints the traceback of an unexpected error.
            raise gr.Error(describe_error(e, image), print_exception=False) from e

    def stop(self, tab: Tab) -> None:
        tab.stop_requested = True

    def new_chat(self, tab: Tab) -> tuple:
        tab.stop_requested = True  # ends a running answer of the old conversation
        return [], Tab(), gr.MultimodalTextbox(value=None, interactive=True), NO_STATS, None

    def build(self) -> gr.Blocks:
        """The Gradio Blocks page, and the API endpoint ``/answer``."""
        with gr.Blocks(title="mlx-eve chat", analytics_enabled=False) as demo:
            page = self._page()
            self._chat_events(page)
            # The API endpoint: no trigger on the page; its settings are the sliders above (defaults, limits).
            gr.on(
                [],
                self.answer,
                [gr.Textbox(label="Question", visible=False), *page.settings, gr.File(label="Image", visible=False)],
                [gr.Textbox(label="Answer", visible=False), gr.JSON(label="Statistics", visible=False)],
                api_name="answer",
                concurrency_id="generate",
            )
        return demo

    def _page(self) -> SimpleNamespace:
        """The page's components, top to bottom (inside ``gr.Blocks``)."""
        page = SimpleNamespace(tab=gr.State(Tab()), pending=gr.State(None))
        gr.Markdown(f"## mlx-eve chat\nModel: {self.loaded(code='`')}", elem_id="header")
        page.chatbot = gr.Chatbot(
            elem_id="chat",
            label="Conversation",
            show_label=False,
            height=520,
            buttons=["copy"],
            # Keeps the new-conversation marker apart from the answer before it.
            group_consecutive_messages=False,
            # As before Gradio 6: the sanitizer drops non-HTML tags in an answer instead of showing them as text.
            allow_tags=False,
            placeholder="Upload an image (or drop, or paste one) and ask about it — or just chat.",
        )
        page.chat_input = gr.MultimodalTextbox(
            elem_id="chat-input",
            placeholder="Ask about the image… (Enter to send, Shift+Enter for a new line)",
            show_label=False,
            file_count="single",
            submit_btn="Send",
            autofocus=True,
        )
        with gr.Row():
            page.stop = gr.Button("Stop", variant="stop", size="sm", elem_id="stop")
            page.clear = gr.Button("New chat", size="sm", elem_id="new-chat")
        page.stats = gr.Markdown(NO_STATS, elem_id="stats")
        with gr.Accordion("Camera", open=False, elem_id="camera"):
            page.camera = gr.Image(
                sources=["webcam"], type="filepath", label="Take a photo; it goes with your next message"
            )
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            page.settings = self._settings()
        gr.Examples(examples=self.examples(), inputs=[page.chat_input], label="Examples", elem_id="examples")
        return page

    def _settings(self) -> list:
        """The sliders and system prompt of Settings, in ``options``'s order."""
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
        max_tokens = gr.Slider(1, min(4096, self.processor.context_length), value=256, step=1, label="Max tokens")
        repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty (1: off)")
        # Not None: until Settings is first opened, Gradio 6 sends this initial value as it is.
        system_prompt = gr.Textbox(value="", label="System prompt", placeholder=self.processor.template.system, lines=2)
        default_size = self.default_max_size or 1600
        resolution = gr.Slider(
            min(224, default_size),
            max(2048, default_size),
            value=default_size,
            step=32,
            label="Image resolution (pixels per side; fewer is faster, with fewer image tokens)",
            visible=self.default_max_size is not None,
        )
        return [temperature, top_p, max_tokens, repetition_penalty, system_prompt, resolution]

    def _chat_events(self, page: SimpleNamespace) -> None:
        """Sending, answering, stopping and starting over."""
        # The chat's events need the tab's state: the page's own, not part of the API.
        private = dict(api_visibility="private")
        answering = page.chat_input.submit(
            self.submit,
            [page.chat_input, page.chatbot, page.tab, page.camera],
            [page.chatbot, page.chat_input, page.pending, page.camera],
            queue=False,
            **private,
        ).then(
            self.respond,
            [page.chatbot, page.tab, page.pending, *page.settings],
            [page.chatbot, page.stats],
            concurrency_id="generate",
            **private,
        )
        # `then` does not follow a failed event in Gradio 6, so `failure` gives the input back after an error.
        for after in (answering.then, answering.failure):
            after(lambda: gr.MultimodalTextbox(interactive=True), None, [page.chat_input], queue=False, **private)
        page.stop.click(self.stop, [page.tab], None, queue=False, **private)
        reset_outputs = [page.chatbot, page.tab, page.chat_input, page.stats, page.pending]
        # Cancelling needs the queue; no concurrency limit, so a running answer does not hold it up.
        for reset in (page.clear.click, page.chatbot.clear):
            reset(self.new_chat, [page.tab], reset_outputs, cancels=[answering], concurrency_limit=None, **private)

    def examples(self) -> List[dict]:
        images = sorted(p for p in EXAMPLE_IMAGES.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
        examples = [
            {"text": question, "files": [str(image)]}
            for image in images
            for question in EXAMPLE_QUESTIONS.get(image.name, [DESCRIBE])
        ]
        return examples + [{"text": TEXT_EXAMPLE, "files": []}]


def new_conversation_marker() -> Message:
    return {
        "role": "assistant",
        "content": "The model does not see the messages above.",
        "metadata": {"title": "New image: a new conversation starts here"},
    }


CSS = """
#stats { font-size: 0.85em; opacity: 0.85; }
"""


def theme() -> gr.themes.Base:
    """The page's look; Gradio takes it, and ``CSS``, in ``launch``."""
    return gr.themes.Soft(font=FONTS, font_mono=MONO_FONTS)


def serve(args: argparse.Namespace) -> None:
    """Load the model and serve the app until Ctrl-C (``KeyboardInterrupt``)."""
    model_path = args.model
    print(f"Loading {model_path} …", flush=True)
    start = time.perf_counter()
    model, processor = load(model_path, adapter_path=args.adapter_path, max_size=args.max_size)
    app = ChatApp(
        model,
        processor,
        Path(model_path).name if Path(model_path).is_dir() else model_path,
        args.adapter_path and Path(args.adapter_path).resolve().name,
    )
    print(f"Loaded {app.loaded()} in {time.perf_counter() - start:.1f} s.", flush=True)
    demo = app.build()
    try:
        try:
            demo.queue(default_concurrency_limit=1).launch(
                server_name=args.host,
                server_port=args.port,
                inbrowser=args.open,
                share=args.share,
                # Gradio's messages speak of its Python API (`share=True` in `launch()`); the address is printed here.
                quiet=True,
                prevent_thread_lock=True,
                theme=theme(),
                css=CSS,
                # No run history: replaying a past call can not restore the conversation in the tab's KV cache.
                run_history=False,
            )
        except OSError as e:
            ports = f"port {args.port} is" if args.port else "the ports from 7860 on are"
            raise EVEError(
                f"Could not serve on {args.host}: {ports} in use, or {args.host} is not an address of this computer. "
                "Choose another --port (or --host)."
            ) from e
        print(f"Running on {demo.local_url} (Ctrl-C to quit)", flush=True)
        while demo.is_running:
            time.sleep(0.1)
    finally:
        # As Gradio's own Ctrl-C handling, this closes the server but not the queue: the answers being generated
        # stop after their current token (`closing`) and end their event streams, which a stopped queue would keep
        # open for seconds. The session heartbeats end too. A second Ctrl-C must not cut this short: MLX can abort
        # at exit unless `app.close` runs.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            app.closing.set()
            if demo.is_running:
                demo.app.stop_event.set()
                demo.server.close()
            app.close()
        finally:
            signal.signal(signal.SIGINT, previous)
