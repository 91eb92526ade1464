"""Tool calls: how the tools a client offers, the calls the model makes and their results appear in EVE's prompt.

EVE's chat templates have no tool format, so mlx-eve uses the one of Qwen2.5, EVEv2's language model: the tools'
JSON signatures inside ``<tools></tools>`` in the system prompt, each call a compact JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>`` lines, and results returned in a
user turn inside ``<tool_response></tool_response>``. A grammar (``tool_call_grammar``) holds the calls to that
form, their names to the offered tools and their arguments to each tool's ``parameters`` schema.
"""

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .structured import closed, lark_grammar

CALL_START, CALL_END = "<tool_call>\n", "\n</tool_call>"
# OpenAI's rule for function names; it also keeps a name free of JSON escapes, which ``ToolCallReader`` relies on.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Dict[str, Any]  # a JSON Schema of the arguments object


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as the model wrote it


def tools_prompt(tools: Sequence[Tool]) -> str:
    """The system prompt's part that offers ``tools`` and says how to call them."""
    signatures = "\n".join(
        json.dumps(
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        )
        for t in tools
    )
    return (
        "# Tools\n\nYou may call one or more functions to answer the user. The function signatures are within "
        f"<tools></tools> XML tags:\n<tools>\n{signatures}\n</tools>\n\nTo call a function, answer with a JSON object "
        "of its name and arguments within <tool_call></tool_call> XML tags, one per call:\n"
        f'{CALL_START}{{"name":<function-name>,"arguments":<args-json-object>}}{CALL_END}'
    )


def tool_call_grammar(tools: Sequence[Tool], choice: Union[str, None], parallel: bool = True) -> str:
    """The grammar of an answer when ``tools`` are offered. ``choice``: ``"auto"`` (text, or calls), ``"required"``
    (calls), or a tool's name (one call of it). ``parallel``: whether an answer may make several calls."""
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t.name == choice]
        parallel = False
    call_body = {"anyOf": [_call_schema(t) for t in tools], "x-guidance": {"whitespace_flexible": False}}
    rules = [
        "calls: call" + (' ("\\n" call)*' if parallel else ""),
        f"call: {json.dumps(CALL_START)} %json {json.dumps(call_body)} {json.dumps(CALL_END)}",
    ]
    if choice == "auto":
        # Free text cannot begin like a call ("<"): the first character decides between the two.
        return lark_grammar("\n".join(["start: calls | TEXT", *rules, r"TEXT: /[^<](.|\n)*/"]))
    return lark_grammar("\n".join(["start: calls", *rules]))


def _call_schema(tool: Tool) -> Dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": closed(tool.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_text(call: ToolCall) -> str:
    """An earlier call, as the model would have written it."""
    return f'{CALL_START}{{"name":{json.dumps(call.name)},"arguments":{call.arguments}}}{CALL_END}'


def result_text(content: str) -> str:
    """A tool's result, as it goes back to the model in a user turn."""
    return f"<tool_response>\n{content}\n</tool_response>"


def parse_tool_calls(text: str) -> Optional[List[ToolCall]]:
    """The calls in an answer the grammar held to the calls' form; ``None`` when the answer is text."""
    if not text.startswith(CALL_START):
        return None
    calls = []
    for body in re.findall(re.escape(CALL_START) + "(.*?)" + re.escape(CALL_END), text, re.S):
        call = json.loads(body)
        calls.append(ToolCall(call["name"], json.dumps(call["arguments"], separators=(",", ":"))))
    return calls


class ToolCallReader:
    """An answer read as it streams: its text, or its calls as they are written, the way OpenAI's deltas give them.

    ``feed`` takes the next piece of the answer and returns ``("content", text)`` deltas, or ``("call", index, name,
    arguments)`` deltas where ``name`` is given once, as soon as the call's name is complete (else ``None``), and
    ``arguments`` is the next piece of the arguments' JSON. It relies on the form the grammar holds calls to:
    compact JSON, the name first, a name without escapes.
    """

    _HEAD = re.compile(r'\{"name":"([^"]*)","arguments":')
    _HOLD = len("}" + CALL_END)  # what may follow the arguments, held back until the call is closed

    def __init__(self) -> None:
        self.text = ""
        self.is_calls: Optional[bool] = None
        self.index = 0  # the call being written
        self.start = 0  # where its body (after CALL_START) begins in ``text``, 0 before it began
        self.named = False  # its name was handed out
        self.sent = 0  # characters of its arguments handed out

    def feed(self, piece: str) -> List[Tuple[Any, ...]]:
        self.text += piece
        if self.is_calls is None and self.text:
            self.is_calls = self.text.startswith("<")
        if not self.is_calls:
            return [("content", piece)] if piece else []
        deltas = []
        while True:
            if not self.start:
                begin = self.text.find(CALL_START)
                if begin < 0:
                    return deltas
                self.start = begin + len(CALL_START)
            body = self.text[self.start :]
            head = self._HEAD.match(body)
            if head is None:
                return deltas
            end = body.find(CALL_END)
            arguments = body[head.end() : end - 1] if end >= 0 else body[head.end() : len(body) - self._HOLD]
            name = None if self.named else head.group(1)
            if name is not None or len(arguments) > self.sent:
                deltas.append(("call", self.index, name, arguments[self.sent :]))
            self.named, self.sent = True, max(self.sent, len(arguments))
            if end < 0:
                return deltas
            self.text = body[end + len(CALL_END) :]
            self.index, self.start, self.named, self.sent = self.index + 1, 0, False, 0
