"""qwen3_jax/server/parsers.py: Qwen3 reasoning and tool-call parsing, whole and streamed split at every position."""

import json

import pytest

from qwen3_jax.server.parsers import ChatStreamParser, ToolCall, parse_chat_output

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Flubarg"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "convert_units", "arguments": {"value": 3, "from": "km", "to": "mi"}}\n</tool_call>'
WEATHER = ToolCall("get_weather", '{"city": "Flubarg"}')

# (text, parser options, reasoning, content, tool calls)
CASES = [
    ("Flubarg", {}, None, "Flubarg", []),
    ("<think>\nThe question asks for the capital.\n</think>\n\nFlubarg", {},
     "The question asks for the capital.", "Flubarg", []),
    ("<think>\n\n</think>\n\nFlubarg", {}, "", "Flubarg", []),
    ("The question asks.\n</think>\n\nQuelt", {"starts_in_reasoning": True}, "The question asks.", "Quelt", []),
    ("<think>\nstill thinking when the tokens ran out", {}, "still thinking when the tokens ran out", "", []),
    ("<think>\nno parser</think>x", {"reasoning": False}, None, "<think>\nno parser</think>x", []),
    (CALL, {"tools": True}, None, "", [WEATHER]),
    ("<think>\nA tool is needed.\n</think>\n\n" + CALL, {"tools": True}, "A tool is needed.", "", [WEATHER]),
    ("Let me check.\n" + CALL + "\n" + CALL2, {"tools": True}, None, "Let me check.",
     [WEATHER, ToolCall("convert_units", '{"value": 3, "from": "km", "to": "mi"}')]),
    (CALL, {}, None, CALL, []),  # no tools in the request: the text stays content
    ("<tool_call>\n{not json}\n</tool_call> after", {"tools": True}, None,
     "<tool_call>\n{not json}\n</tool_call> after", []),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1', {"tools": True}, None,
     '<tool_call>\n{"name": "f", "arguments": {"a": 1', []),  # never closed: content as written
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', {"tools": True}, None, "",
     [ToolCall("f", '{"a": 1}')]),  # arguments already a JSON string
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', {"tools": True}, None,
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ("Answer: 3 < 4 and <tool", {"tools": True}, None, "Answer: 3 < 4 and <tool", []),
    ("The sky is blue. ", {}, None, "The sky is blue.", []),
]


@pytest.mark.parametrize("text, opts, reasoning, content, calls", CASES)
def test_parse_whole_output(text, opts, reasoning, content, calls):
    got = parse_chat_output(text, **opts)
    assert (got.reasoning, got.content, got.tool_calls) == (reasoning, content, calls)


def _stream(text, opts, cuts):
    parser = ChatStreamParser(**opts)
    reasoning, content, calls = "", "", []
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    so_far = ""
    for k, piece in enumerate(pieces):
        so_far += piece
        d = parser.feed(so_far, final=k == len(pieces) - 1)
        reasoning += d.reasoning
        content += d.content
        for index, call_id, call in d.tool_calls:
            assert index == len(calls) and call_id.startswith("call_")
            calls.append(call)
    return reasoning, content, calls


@pytest.mark.parametrize("text, opts, reasoning, content, calls", CASES)
def test_streamed_pieces_join_to_the_whole_at_every_split(text, opts, reasoning, content, calls):
    for cut in range(len(text) + 1):  # one split point anywhere
        assert _stream(text, opts, [cut]) == (reasoning or "", content, calls), cut
    for step in (1, 2, 3, 7):  # a piece every few characters (each tag split every way)
        assert _stream(text, opts, list(range(step, len(text), step))) == (reasoning or "", content, calls), step


def test_streamed_call_arrives_whole_once_closed():
    parser = ChatStreamParser(tools=True)
    text = "Checking. " + CALL
    close = text.index("</tool_call>")
    assert parser.feed(text[:close]).tool_calls == []
    delta = parser.feed(text[:close + len("</tool_call>")])
    (index, call_id, call), = delta.tool_calls
    assert index == 0 and call == WEATHER and json.loads(call.arguments) == {"city": "Flubarg"}
    assert parser.content_sent == "Checking."


def test_partial_think_tag_is_held_back():
    parser = ChatStreamParser()
    assert not parser.feed("<thi")
    d = parser.feed("<think>\nabc")
    assert d.reasoning == "abc" and d.content == ""
