"""The conversation templates EVE was trained with (EVEv1/eve/conversation.py, EVEv2/eve/conversation.py).

Both are Vicuna-style ``SeparatorStyle.TWO``: ``SYSTEM USER: question ASSISTANT: answer<stop>USER: ...``.
EVEv2's ``qwen2`` template is this same layout with ``<|im_end|>`` as the answer terminator, not ChatML.

A template renders a conversation as ``Piece``s: text, the ``Special`` tokens it writes itself, and ``IMAGE``
slots. Only those are special: whatever a message says is text, so that ``</s>`` or ``<|im_end|>`` written in a
message cannot end a turn. A message's content is a string, where ``<image>`` marks an image, or a list of parts
as transformers' chat templates take them, ``{"type": "image"}`` and ``{"type": "text", "text": ...}``, whose
text is text throughout.
"""

import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import PromptError

IMAGE_PLACEHOLDER = "<image>"
# Asked when images come without a question.
DESCRIBE = "Describe the image."

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Content = Union[str, List[Dict[str, str]]]
Messages = List[Dict[str, Any]]
# What the processor and the generation functions take: a question, or a list of role/content messages.
Prompt = Union[str, Sequence[Dict[str, Any]]]


class RawPrompt(str):
    """A prompt the model continues as it is, without the conversation template: ``<image>`` stands for an image,
    and special tokens written in it are special tokens."""


class Special(str):
    """A special token a template writes (the end of an answer): its id, where the same characters in a message
    are text."""


class ImageSlot:
    """Where an image's tokens go (``IMAGE``, the one instance)."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = ImageSlot()
Piece = Union[str, Special, ImageSlot]


def content_pieces(content: Content) -> List[Piece]:
    """A message's content as text and ``IMAGE`` slots: a string's ``<image>`` placeholders, or a list's image
    parts (its parts joined by new lines, so that an image before a question reads ``<image>\nquestion``)."""
    if isinstance(content, str):
        pieces: List[Piece] = []
        for i, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            pieces += ([IMAGE] if i else []) + ([text] if text else [])
        return pieces
    pieces = []
    for i, part in enumerate(content):
        pieces += (["\n"] if i else []) + ([IMAGE] if part["type"] == "image" else [part["text"]])
    return pieces


def raw_pieces(text: str, special_tokens: Iterable[str]) -> List[Piece]:
    """A raw prompt's pieces: ``special_tokens`` written in it are special tokens, ``<image>`` an image."""
    markers = sorted({*special_tokens, IMAGE_PLACEHOLDER}, key=len, reverse=True)
    pieces: List[Piece] = []
    for i, part in enumerate(re.split("(" + "|".join(map(re.escape, markers)) + ")", text)):
        if i % 2 == 0:
            pieces += [part] if part else []
        else:
            pieces.append(IMAGE if part == IMAGE_PLACEHOLDER else Special(part))
    return pieces


def check_system(system: str) -> None:
    """A system prompt given as a string may not hold an ``<image>`` placeholder: its text is no message's."""
    if IMAGE_PLACEHOLDER in system:
        raise PromptError(f"The system prompt may not contain {IMAGE_PLACEHOLDER}: put images in a user message.")


def text_of(content: Content) -> str:
    """A content's text (parts joined by new lines); ``PromptError`` if it holds an image."""
    if isinstance(content, str):
        return content
    if count_images(content):
        raise PromptError("A system prompt cannot hold images: put them in a user message.")
    return "\n".join(part["text"] for part in content)


def images_first(messages: Sequence[Dict[str, Any]]) -> Messages:
    """``messages`` with each list content's image parts moved before its text, in their order: EVE was trained
    on ``<image>\nquestion``, and answers a question written before its image far worse."""
    return [
        {**m, "content": sorted(m["content"], key=lambda part: part["type"] != "image")}
        if isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


def render(pieces: Sequence[Piece]) -> str:
    """Pieces as one string, ``<image>`` for each image slot: the prompt as a person reads it."""
    return "".join(IMAGE_PLACEHOLDER if piece is IMAGE else piece for piece in pieces)


@dataclass(frozen=True)
class Template:
    name: str
    answer_end: str
    stop_tokens: Tuple[str, ...]
    system: str = DEFAULT_SYSTEM
    roles: Tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "

    def pieces(self, messages: Messages, system: Optional[str] = None) -> List[Piece]:
        """Alternating user/assistant messages as pieces. A conversation that ends with the user opens the answer
        (``... ASSISTANT:``); one that ends with the assistant is closed with ``answer_end``, as the model saw it
        in training."""
        check_turns(messages)
        separators = (self.sep, Special(self.answer_end))
        pieces: List[Piece] = [(self.system if system is None else system) + self.sep]
        turns = [(m["role"] == "assistant", m["content"]) for m in messages]
        if not turns[-1][0]:
            turns.append((True, ""))
        for is_assistant, content in turns:
            role = self.roles[is_assistant]
            # The reference writes a bare "ROLE:" for an empty message, which is also how the answer opens.
            if content:
                pieces += [f"{role}: ", *content_pieces(content), separators[is_assistant]]
            else:
                pieces.append(f"{role}:")
        return pieces

    def format(self, messages: Messages, system: Optional[str] = None) -> str:
        """The conversation as one string (``pieces``, rendered)."""
        return render(self.pieces(messages, system))


TEMPLATES = {
    "vicuna_v1": Template("vicuna_v1", answer_end="</s>", stop_tokens=("</s>",)),
    "qwen2": Template("qwen2", answer_end="<|im_end|>", stop_tokens=("<|im_end|>", "<|endoftext|>")),
}


def check_turns(messages: Messages) -> None:
    if not messages:
        raise PromptError("The conversation is empty: give at least one user message.")
    for i, message in enumerate(messages):
        expected = "assistant" if i % 2 else "user"
        if message.get("role") not in ("user", "assistant"):
            raise PromptError(
                f"Message {i} has the role {message.get('role')!r}: use 'user' and 'assistant' (and 'system' "
                "for a first message that sets the system prompt)."
            )
        if message["role"] != expected:
            raise PromptError(
                f"Message {i} should be the {expected}'s: messages must alternate user/assistant, "
                "starting with the user."
            )
        content = message.get("content")
        if not (isinstance(content, str) or _is_parts(content)):
            raise PromptError(
                f"Message {i} ({expected}) has no text: its content is {content!r}, not a string or a list of "
                "{'type': 'image'} and {'type': 'text', 'text': ...} parts."
            )


def _is_parts(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(part, dict)
        and (part.get("type") == "image" or (part.get("type") == "text" and isinstance(part.get("text"), str)))
        for part in content
    )


def count_images(content: Content) -> int:
    if isinstance(content, str):
        return content.count(IMAGE_PLACEHOLDER)
    return sum(part["type"] == "image" for part in content)


def to_messages(prompt: Union[str, Sequence[Dict[str, str]]]) -> Tuple[Messages, Optional[str]]:
    """A question or a message list → (user/assistant messages, system prompt given as a message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], None
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) for m in prompt):
        raise PromptError(
            f"The prompt must be a question (a string) or a list of {{'role', 'content'}} messages, not {prompt!r}."
        )
    messages = [dict(m) for m in prompt]
    system = None
    if messages and messages[0].get("role") == "system":
        system = messages.pop(0).get("content")
        if isinstance(system, str):
            check_system(system)
        elif _is_parts(system):
            system = text_of(system)  # parts: their text is text, "<image>" included
        else:
            raise PromptError(f"The system message has no text: its content is {system!r}.")
        if not messages:
            raise PromptError("The conversation has only a system message: add a user message.")
    return messages, system


def place_images(messages: Messages, num_images: int) -> Messages:
    """Check the ``<image>`` placeholders against the images; with none, put them before the first question.

    The reference builds its query as ``"<image>\\n" + question`` (EVEv*/eve/eval/run_eve.py).
    """
    found = sum(count_images(m["content"]) for m in messages if m["role"] == "user")
    if found == 0 and num_images > 0:
        messages = [dict(m) for m in messages]
        content = messages[0]["content"]
        if isinstance(content, str):
            messages[0]["content"] = (IMAGE_PLACEHOLDER + "\n") * num_images + content
        else:
            messages[0]["content"] = [{"type": "image"}] * num_images + content
    elif found != num_images:
        raise PromptError(
            f"The prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given."
        )
    for m in messages:
        if m["role"] == "assistant" and count_images(m["content"]):
            raise PromptError(f"Only user messages may contain {IMAGE_PLACEHOLDER}.")
    return messages
