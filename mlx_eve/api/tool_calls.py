"""OpenAI's tool calls in chat completions: ``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked, earlier
calls and ``role: tool`` results turned into EVE's turns, and the answer's calls as ``tool_calls`` (whole, or as
streamed deltas). The prompt and grammar side is ``mlx_eve/tools.py``."""

import json
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..errors import shorten
from ..prompts import text_of
from ..tools import TOOL_NAME, Tool, ToolCall, ToolCallReader, call_text, result_text, tool_call_grammar, tools_prompt
from .errors import APIError
from .fields import option

TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


@dataclass
class Tools:
    """The tools a request offers and how it lets the model use them."""

    tools: List[Tool]
    choice: str  # "auto", "required" or a tool's name ("none" leaves a request without ``Tools``)
    parallel: bool

    def grammar(self) -> str:
        return tool_call_grammar(self.tools, self.choice, self.parallel)

    def system_prompt(self, system: str) -> str:
        return f"{system}\n\n{tools_prompt(self.tools)}"


def parse_tools(body: Dict[str, Any]) -> Optional[Tools]:
    """The request's tools; ``None`` when it offers none or forbids their use (``tool_choice: "none"``)."""
    tools = option(body, "tools", list, "a list of tools", default=[])
    tools = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    names = [tool.name for tool in tools]
    if len(set(names)) < len(names):
        raise APIError(400, "Invalid 'tools': two tools have the same name.", "tools")
    choice = _choice(body.get("tool_choice", "auto" if tools else "none"), names)
    parallel = option(body, "parallel_tool_calls", bool, "true or false", default=True)
    return Tools(tools, choice, parallel) if tools and choice != "none" else None


def _tool(tool: Any, where: str) -> Tool:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict):
        raise APIError(400, f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}.", where)
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        wanted = "1 to 64 letters, digits, '_' or '-'"
        message = f"Invalid '{where}.function.name': expected {wanted}, got {shorten(json.dumps(name))}."
        raise APIError(400, message, f"{where}.function.name")
    description = option(function, "description", str, "a string", default="", where=f"{where}.function.")
    parameters = option(
        function, "parameters", dict, "a JSON Schema object", default={"type": "object"}, where=f"{where}.function."
    )
    return Tool(name, description, parameters)


def _choice(choice: Any, names: List[str]) -> str:
    if choice in ("none", "auto", "required"):
        if choice != "none" and not names:
            raise APIError(400, f"'tool_choice' is {choice!r} but the request offers no 'tools'.", "tool_choice")
        return choice
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if name not in names:
        wanted = "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': <one of the tools>}}"
        raise APIError(
            400, f"Invalid 'tool_choice': expected {wanted}, got {shorten(json.dumps(choice))}.", "tool_choice"
        )
    return name


def tool_turn(message: Dict[str, Any], where: str) -> Optional[Dict[str, str]]:
    """An assistant message with ``tool_calls`` or a ``role: tool`` result as an EVE turn; ``None`` for any other
    message. A result is the user's turn: EVE's templates know only user and assistant."""
    if message.get("role") == "tool":
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(part.get("text", "") if isinstance(part, dict) else "" for part in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be the tool's result as text.", f"{where}.content")
        return {"role": "user", "content": [{"type": "text", "text": result_text(content)}]}
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not calls:
        return None
    if not isinstance(calls, list):
        raise APIError(400, f"{where}.tool_calls must be a list of calls.", f"{where}.tool_calls")
    texts = [call_text(_earlier_call(call, f"{where}.tool_calls[{i}]")) for i, call in enumerate(calls)]
    content = message.get("content")
    text = "\n".join(([content] if isinstance(content, str) and content else []) + texts)
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _earlier_call(call: Any, where: str) -> ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(name, str) or not isinstance(parsed, dict):
        wanted = "{'function': {'name': ..., 'arguments': <a JSON object, as a string>}}"
        raise APIError(400, f"{where} must be {wanted}.", where)
    return ToolCall(name, json.dumps(parsed, separators=(",", ":")))


def with_tools_prompt(messages: List[Dict[str, str]], tools: Tools, default_system: str) -> List[Dict[str, str]]:
    """``messages`` with the tools offered in their system prompt (the template's own when they have none)."""
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": tools.system_prompt(text_of(messages[0]["content"]))}, *messages[1:]]
    return [{"role": "system", "content": tools.system_prompt(default_system)}, *messages]


def merge_turns(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Consecutive messages of one role as one turn (several tool results, or a result and the user's next words),
    their content parts one after the other (joined by new lines, as a message's parts are)."""
    merged: List[Dict[str, Any]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"] != "system":
            merged[-1] = {"role": message["role"], "content": merged[-1]["content"] + message["content"]}
        else:
            merged.append(message)
    return merged


def calls_json(calls: List[ToolCall]) -> List[Dict[str, Any]]:
    """An answer's ``message.tool_calls``."""
    return [
        {"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallDeltas:
    """The ``delta`` of each chunk of a streamed answer when tools are offered: content, or ``tool_calls`` pieces
    (a call's id, type and name in its first delta, then pieces of its arguments)."""

    def __init__(self) -> None:
        self.reader = ToolCallReader()

    def __call__(self, text: str) -> List[Dict[str, Any]]:
        return [self._delta(piece) for piece in self.reader.feed(text)]

    @property
    def calls(self) -> bool:
        """Whether the answer is calls rather than text."""
        return bool(self.reader.is_calls)

    @staticmethod
    def _delta(piece: Tuple[Any, ...]) -> Dict[str, Any]:
        if piece[0] == "content":
            return {"content": piece[1]}
        _, index, name, arguments = piece
        call: Dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
        if name is not None:
            call.update(id=call_id(), type="function")
            call["function"]["name"] = name
        return {"tool_calls": [call]}
