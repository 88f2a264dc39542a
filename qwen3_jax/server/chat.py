"""`POST /v1/chat/completions`: messages through the chat template (tools, `enable_thinking`), then Qwen3's output
split into `reasoning_content`, `content` and `tool_calls`, whole or streamed."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

import jinja2

from .errors import APIError, bad_request
from .logprobs import chat_logprobs
from .parsers import ChatStreamParser, parse_chat_output
from .protocol import ChatCompletionRequest
from .serving import SSE_DONE, Serving, sse, usage

_TEMPLATE_ARGS = {"messages", "tools", "documents", "add_generation_prompt", "enable_thinking", "tokenize"}


def _message_dict(m) -> dict:
    """A validated message as the chat template reads it (text parts joined, tool-call arguments as given)."""
    content = m.content
    if isinstance(content, list):
        content = "".join(p.text or "" for p in content)
    out = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                             for c in m.tool_calls]
    for name in ("name", "tool_call_id", "reasoning_content"):
        if getattr(m, name) is not None:
            out[name] = getattr(m, name)
    return out


def _arguments(text: str):
    # Qwen3's template writes a dict with tojson and a string as is: parse, so both spellings render alike.
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise bad_request(f"tool call arguments must be a JSON object, got {text[:80]!r}",
                          param="messages.tool_calls.function.arguments") from None
    return value


@dataclasses.dataclass
class ChatPrompt:
    ids: list[int]
    starts_in_reasoning: bool  # the template left a <think> block open for the model
    tools: bool  # parse <tool_call> blocks


def build_prompt(serving: Serving, req: ChatCompletionRequest) -> ChatPrompt:
    """Render and tokenize the conversation; 400 for anything the template or the limits refuse."""
    if serving.tokenizer is None:
        raise bad_request("this model has no tokenizer: chat needs one (use /v1/completions with token ids)")
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(_TEMPLATE_ARGS & set(kwargs) - {"enable_thinking"})
    if reserved:
        raise bad_request(f"chat_template_kwargs cannot set {reserved}", param="chat_template_kwargs")
    thinking = kwargs.pop("enable_thinking", None)
    if thinking is not None and not isinstance(thinking, bool):
        raise bad_request(f"chat_template_kwargs.enable_thinking must be true or false, got {thinking!r}",
                          param="chat_template_kwargs")
    use_tools = bool(req.tools) and req.tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
    messages = [_message_dict(m) for m in req.messages]
    try:
        text = serving.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                                     tools=tools, **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise bad_request(f"the chat template could not render these messages: {e}", param="messages") from None
    ids = serving.tokenizer.encode(text)
    serving.check_prompt(ids, "the rendered messages")
    return ChatPrompt(ids, text.rstrip().endswith("<think>"), use_tools)


def _message(text: str, prompt: ChatPrompt, reasoning: bool) -> tuple[dict, bool]:
    parsed = parse_chat_output(text, starts_in_reasoning=prompt.starts_in_reasoning, reasoning=reasoning,
                               tools=prompt.tools)
    msg = {"role": "assistant", "content": parsed.content if parsed.content or not parsed.tool_calls else None}
    if parsed.reasoning is not None:
        msg["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        msg["tool_calls"] = [_tool_call_json(c, f"call_{uuid.uuid4().hex[:24]}") for c in parsed.tool_calls]
    return msg, bool(parsed.tool_calls)


def _tool_call_json(call, call_id: str, index: int | None = None) -> dict:
    out = {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


def _finish(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


async def chat_completion(serving: Serving, req: ChatCompletionRequest):
    """Validate, submit, and return either the response dict or an async iterator of SSE strings."""
    serving.check_request(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    prompt = build_prompt(serving, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = serving.sampling_params(req, len(prompt.ids), max_tokens,
                                     (req.top_logprobs or 0) if req.logprobs else None)
    seeds = [None if params.seed is None else (params.seed + i) % 2**32 for i in range(req.n)]
    choices = [params if s is None else dataclasses.replace(params, seed=s) for s in seeds]
    group = await serving.start([prompt.ids] * req.n, choices)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
    reasoning = serving.config.reasoning_parser == "qwen3"
    if req.stream:
        return group, _stream(serving, req, prompt, group, meta, reasoning)
    outs = await _final(group)
    return group, _response(serving, req, prompt, outs, meta, reasoning)


async def _final(group):
    try:
        return await group.final()
    finally:
        group.abort()  # cancelled (client gone): free the engine's work


def _response(serving, req, prompt, outs, meta, reasoning) -> dict:
    choices = []
    for i, out in enumerate(outs):
        c = out.outputs[0]
        msg, called = _message(c.text or "", prompt, reasoning)
        choice = {"index": i, "message": msg, "logprobs": None, "finish_reason": _finish(c.finish_reason, called)}
        if c.stop_reason is not None:
            choice["stop_reason"] = c.stop_reason
        if req.logprobs:
            choice["logprobs"] = {"content": chat_logprobs(serving.tokenizer, c.token_ids, c.logprobs,
                                                           req.top_logprobs or 0)}
        choices.append(choice)
    completion = sum(len(o.outputs[0].token_ids) for o in outs)
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(len(prompt.ids), completion),
            "system_fingerprint": None}


async def _stream(serving, req, prompt, group, meta, reasoning):
    """SSE chunks: a role chunk per choice, then deltas (reasoning, content, whole tool calls), a finish chunk per
    choice, the usage chunk if asked, and `[DONE]`. A client that goes away aborts the requests (the caller closes
    this generator)."""
    head = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None}
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    usage_field = {"usage": None} if include_usage else {}
    parsers = [ChatStreamParser(starts_in_reasoning=prompt.starts_in_reasoning, reasoning=reasoning,
                                tools=prompt.tools) for _ in range(req.n)]
    sent_tokens = [0] * req.n

    def chunk(i, delta, finish=None, logprobs=None):
        return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                    **usage_field})

    try:
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for changed in group.updates():
            for i in changed:
                c = group.latest[i].outputs[0]
                d = parsers[i].feed(c.text or "", final=c.finish_reason is not None)
                lp = None
                if req.logprobs and len(c.token_ids) > sent_tokens[i]:
                    lp = {"content": chat_logprobs(serving.tokenizer, c.token_ids[sent_tokens[i]:],
                                                   c.logprobs[sent_tokens[i]:], req.top_logprobs or 0)}
                sent_tokens[i] = len(c.token_ids)
                delta = {}
                if d.reasoning:
                    delta["reasoning_content"] = d.reasoning
                if d.content:
                    delta["content"] = d.content
                if d.tool_calls:
                    delta["tool_calls"] = [_tool_call_json(call, cid, k) for k, cid, call in d.tool_calls]
                if delta or lp:
                    yield chunk(i, delta, logprobs=lp)
                if c.finish_reason is not None:
                    yield chunk(i, {}, _finish(c.finish_reason, bool(parsers[i].call_ids)))
        if include_usage:
            completion = sum(len(o.outputs[0].token_ids) for o in group.latest)
            yield sse({**head, "choices": [], "usage": usage(len(prompt.ids), completion)})
        yield SSE_DONE
    except Exception as e:  # headers are sent: report the failure in the stream, as vLLM does
        err = e if isinstance(e, APIError) else APIError(500, f"{type(e).__name__}: {e}")
        yield sse(err.body())
        yield SSE_DONE
    finally:
        group.abort()
