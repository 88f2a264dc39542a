"""Qwen3's output conventions: `<think>...</think>` reasoning and `<tool_call>{json}</tool_call>` calls.

`parse_chat_output(text, ...)` splits a whole generated text into reasoning, content and tool calls.
`ChatStreamParser` does the same on a growing text and returns only what is new: `parse_chat_output` on a prefix
holds back what later text could still change (a half-written tag, trailing whitespace, an unclosed call), so
what one call returns is always a prefix of what a longer text returns and the streamed pieces join to the
non-streamed result.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

THINK_START, THINK_END = "<think>", "</think>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function name and its arguments as a JSON string (OpenAI's form)."""

    name: str
    arguments: str


@dataclasses.dataclass
class ParsedOutput:
    reasoning: str | None  # None when the text has no reasoning part
    content: str
    tool_calls: list[ToolCall]


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `tags` (it may become that tag)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def _hold(text: str, final: bool, tags: tuple[str, ...]) -> str:
    """What of a growing text can be shown now: without a half-written tag or trailing whitespace at its end."""
    if final:
        return text.rstrip()
    n = _partial_suffix(text, tags)
    return (text[:-n] if n else text).rstrip()


def split_reasoning(text: str, *, starts_in_reasoning: bool, final: bool) -> tuple[str | None, str, bool]:
    """(reasoning, the rest, whether the rest may be shown). Reasoning is the text after a leading `<think>` (or
    from the start when the prompt opened the block) up to `</think>`; a block never closed is all reasoning."""
    start = 0
    if not starts_in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_START):
            if not final and stripped and THINK_START.startswith(stripped):
                return None, "", False  # "<thi": may still become the opening tag
            return None, text, True
        start = len(text) - len(stripped) + len(THINK_START)
    end = text.find(THINK_END, start)
    if end < 0:
        body = text[start:].lstrip("\n")
        body = body if final else body[:len(body) - _partial_suffix(body, (THINK_END,))]
        return body.rstrip("\n") if final else body.rstrip(), "", False
    return text[start:end].strip("\n"), text[end + len(THINK_END):], True


def _tool_call(body: str) -> ToolCall | None:
    """A call from the JSON between the tags, or None when it is not {"name": str, "arguments": object}."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments already encoded
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def split_tool_calls(text: str, *, final: bool) -> tuple[str, list[ToolCall]]:
    """(content, calls): closed `<tool_call>` blocks holding valid JSON become calls, the text around them content
    (whitespace next to a call dropped); a block with bad JSON, or one never closed, stays content as written."""
    content, calls, pos = "", [], 0
    after_call = False
    while True:
        i = text.find(CALL_START, pos)
        if i < 0:
            tail = text[pos:]
            content += _hold(tail.lstrip() if after_call else tail, final, (CALL_START,))
            return content, calls
        j = text.find(CALL_END, i + len(CALL_START))
        if j < 0:
            if final:  # never closed: the model ran out of tokens mid-call
                content += text[pos:]
                return content.rstrip(), calls
            # Until it closes nobody knows whether it is a call; the text before it waits with it.
            content += _hold(text[pos:i].lstrip() if after_call else text[pos:i], False, ())
            return content, calls
        call = _tool_call(text[i + len(CALL_START):j])
        if call is None:
            content += text[pos:j + len(CALL_END)]
            after_call = False
        else:
            segment = text[pos:i]
            content += (segment.lstrip() if after_call else segment).rstrip()
            calls.append(call)
            after_call = True
        pos = j + len(CALL_END)


def parse_chat_output(text: str, *, starts_in_reasoning: bool = False, reasoning: bool = True, tools: bool = False,
                      final: bool = True) -> ParsedOutput:
    """Split generated text into reasoning, content and tool calls (see the module docstring)."""
    if reasoning:
        thought, rest, shown = split_reasoning(text, starts_in_reasoning=starts_in_reasoning, final=final)
    else:
        thought, rest, shown = None, text, True
    if not shown:
        return ParsedOutput(thought, "", [])
    rest = rest.lstrip()
    if tools:
        content, calls = split_tool_calls(rest, final=final)
    else:
        content, calls = _hold(rest, final, ()), []
    return ParsedOutput(thought, content, calls)


@dataclasses.dataclass
class StreamDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[tuple[int, str, ToolCall]] = dataclasses.field(default_factory=list)  # (index, id, call)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChatStreamParser:
    """Feed the cumulative text after each step; get back the reasoning, content and tool calls that are new."""

    def __init__(self, *, starts_in_reasoning: bool = False, reasoning: bool = True, tools: bool = False):
        self.options = dict(starts_in_reasoning=starts_in_reasoning, reasoning=reasoning, tools=tools)
        self.reasoning_sent = ""
        self.content_sent = ""
        self.call_ids: list[str] = []

    def feed(self, text: str, final: bool = False) -> StreamDelta:
        parsed = parse_chat_output(text, final=final, **self.options)
        delta = StreamDelta()
        delta.reasoning = _new(parsed.reasoning or "", self.reasoning_sent)
        self.reasoning_sent += delta.reasoning
        delta.content = _new(parsed.content, self.content_sent)
        self.content_sent += delta.content
        for index in range(len(self.call_ids), len(parsed.tool_calls)):
            self.call_ids.append(new_call_id())
            delta.tool_calls.append((index, self.call_ids[index], parsed.tool_calls[index]))
        return delta


def _new(now: str, sent: str) -> str:
    if not now.startswith(sent):  # cannot happen for text that only grows (the tests check every split point)
        raise AssertionError(f"streamed text {sent!r} is not a prefix of the parsed text {now!r}")
    return now[len(sent):]


def new_call_id() -> str:
    """An id for a tool call, in OpenAI's `call_...` form."""
    return "call_" + uuid.uuid4().hex[:24]
