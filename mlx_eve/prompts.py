"""The conversation templates EVE was trained with (EVEv1/eve/conversation.py, EVEv2/eve/conversation.py).

Both are Vicuna-style ``SeparatorStyle.TWO``: ``SYSTEM USER: question ASSISTANT: answer<stop>USER: ...``.
EVEv2's ``qwen2`` template is this same layout with ``<|im_end|>`` as the answer terminator, not ChatML.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .errors import PromptError

IMAGE_PLACEHOLDER = "<image>"
# Asked when images come without a question.
DESCRIBE = "Describe the image."

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Messages = List[Dict[str, str]]
# What the processor and the generation functions take: a question, or a list of role/content messages.
Prompt = Union[str, Sequence[Dict[str, str]]]


class RawPrompt(str):
    """A prompt the model continues as it is, without the conversation template (``<image>`` stands for an image)."""


@dataclass(frozen=True)
class Template:
    name: str
    answer_end: str
    stop_tokens: Tuple[str, ...]
    system: str = DEFAULT_SYSTEM
    roles: Tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "

    def format(self, messages: Messages, system: Optional[str] = None) -> str:
        """Render alternating user/assistant messages. A conversation that ends with the user opens the
        answer (``... ASSISTANT:``); one that ends with the assistant is closed with ``answer_end``, as
        the model saw it in training."""
        check_turns(messages)
        separators = (self.sep, self.answer_end)
        prompt = (self.system if system is None else system) + self.sep
        turns = [(m["role"] == "assistant", m["content"]) for m in messages]
        if not turns[-1][0]:
            turns.append((True, ""))
        for is_assistant, content in turns:
            role = self.roles[is_assistant]
            # The reference writes a bare "ROLE:" for an empty message, which is also how the answer opens.
            prompt += f"{role}: {content}{separators[is_assistant]}" if content else f"{role}:"
        return prompt


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
        if not isinstance(message.get("content"), str):
            raise PromptError(f"Message {i} ({expected}) has no text: its content is {message.get('content')!r}.")


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
        if not isinstance(system, str):
            raise PromptError(f"The system message has no text: its content is {system!r}.")
        if not messages:
            raise PromptError("The conversation has only a system message: add a user message.")
    return messages, system


def place_images(messages: Messages, num_images: int) -> Messages:
    """Check the ``<image>`` placeholders against the images; with none, put them before the first question.

    The reference builds its query as ``"<image>\\n" + question`` (EVEv*/eve/eval/run_eve.py).
    """
    found = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
    if found == 0 and num_images > 0:
        messages = [dict(m) for m in messages]
        messages[0]["content"] = (IMAGE_PLACEHOLDER + "\n") * num_images + messages[0]["content"]
    elif found != num_images:
        raise PromptError(
            f"The prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given."
        )
    for m in messages:
        if m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"]:
            raise PromptError(f"Only user messages may contain {IMAGE_PLACEHOLDER}.")
    return messages
