"""Tool calls in chat completions, asked with the ``openai`` client of a server process: calls held to the offered
tools' schemas (checked with ``jsonschema``), streamed as deltas, and earlier calls and results in later turns."""

import json

import jsonschema
import pytest
from processes import http_request

from mlx_eve import generate
from mlx_eve.api.chat_completions import parse_chat_request
from mlx_eve.api.tool_calls import with_tools_prompt
from mlx_eve.structured import GrammarProcessor
from mlx_eve.tools import Tool, ToolCallReader, parse_tool_calls, tool_call_grammar

openai = pytest.importorskip("openai")

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days", "metric"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
QUESTION = [{"role": "user", "content": "What will the weather be in Oslo?"}]


def check_calls(calls, names=SCHEMAS):
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_follow_the_tools_schemas(client, model_id):
    response = client.chat.completions.create(
        model=model_id, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=150
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)


def test_a_named_choice_calls_that_tool_once(client, model_id):
    choice = {"type": "function", "function": {"name": "get_time"}}
    response = client.chat.completions.create(
        model=model_id, messages=QUESTION, tools=TOOLS, tool_choice=choice, max_tokens=80
    )
    calls = response.choices[0].message.tool_calls
    assert len(calls) == 1
    check_calls(calls, names={"get_time"})


def test_streamed_calls_are_the_whole_calls_in_deltas(client, model_id):
    options = dict(model=model_id, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=150)
    whole = client.chat.completions.create(**options).choices[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(**options, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert all(call["id"].startswith("call_") for call in calls.values())
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == expected


def test_auto_and_none_answer_in_text_when_the_model_does_not_call(client, model_id):
    plain = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=8).choices[0]
    assert not plain.message.content.startswith("<")  # the random model does not begin with a call
    none = client.chat.completions.create(
        model=model_id, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=8
    ).choices[0]
    assert none.message.content == plain.message.content and none.message.tool_calls is None
    auto = client.chat.completions.create(model=model_id, messages=QUESTION, tools=TOOLS, max_tokens=8).choices[0]
    assert auto.message.tool_calls is None and auto.finish_reason in ("stop", "length")
    assert auto.message.content and not auto.message.content.startswith("<")


def test_earlier_calls_and_their_results_are_later_turns(client, model_id):
    earlier = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [earlier]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "user", "content": "And in Paris?"},
    ]
    response = client.chat.completions.create(model=model_id, messages=messages, tools=TOOLS, max_tokens=4)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_prompt_offers_the_tools_and_carries_calls_and_results(v2_model):
    _, processor = v2_model
    earlier = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    body = {
        "messages": [
            *QUESTION,
            {"role": "assistant", "tool_calls": [earlier]},
            {"role": "tool", "content": "12:00"},
            {"role": "tool", "content": "13:00"},
        ],
        "tools": TOOLS,
    }
    chat = parse_chat_request(body, 512)
    prompt = processor.format(with_tools_prompt(chat.messages, chat.tools, "SYSTEM."))
    assert prompt.startswith("SYSTEM.\n\n# Tools\n")
    assert '{"type": "function", "function": {"name": "get_weather", "description": "The forecast."' in prompt
    assert ' ASSISTANT: <tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"}}\n</tool_call>' in prompt
    assert (
        "USER: <tool_response>\n12:00\n</tool_response>\n<tool_response>\n13:00\n</tool_response> ASSISTANT:" in prompt
    )


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_both_families_call_within_the_grammar(family, v1_model, v2_model):
    model, processor = v1_model if family == "v1" else v2_model
    tools = [Tool(t["function"]["name"], "", t["function"]["parameters"]) for t in TOOLS]
    grammar = GrammarProcessor(tool_call_grammar(tools, "required", parallel=False), processor.tokenizer)
    text = generate(model, processor, "Weather?", max_tokens=150, logits_processors=[grammar])
    calls = parse_tool_calls(text)
    assert len(calls) == 1 and text.endswith("</tool_call>")
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])


def test_reader_splits_calls_however_the_text_is_cut():
    text = (
        '<tool_call>\n{"name":"a","arguments":{"s":"}\\n</tool_call>","n":{"m":1}}}\n</tool_call>\n'
        '<tool_call>\n{"name":"b","arguments":{}}\n</tool_call>'
    )
    expected = {0: ["a", '{"s":"}\\n</tool_call>","n":{"m":1}}'], 1: ["b", "{}"]}
    for size in (1, 2, 5, len(text)):
        reader, calls = ToolCallReader(), {}
        for start in range(0, len(text), size):
            for kind, index, name, arguments in reader.feed(text[start : start + size]):
                assert kind == "call"
                call = calls.setdefault(index, ["", ""])
                call[0], call[1] = call[0] + (name or ""), call[1] + arguments
        assert calls == expected, size
    assert ToolCallReader().feed("It is noon.") == [("content", "It is noon.")]


@pytest.mark.parametrize(
    "change, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (
            {"messages": [*QUESTION, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
            "messages[1].tool_calls[0]",
        ),
    ],
)
def test_bad_tools_are_a_400_naming_the_field(server, change, param):
    body = {"messages": QUESTION, "max_tokens": 2, **change}
    status, answer = http_request(server, "POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param
