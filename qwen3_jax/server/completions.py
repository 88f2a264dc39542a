"""`POST /v1/completions`: prompts as text or token ids (one or a batch), `n` choices each, whole or streamed."""

from __future__ import annotations

import dataclasses
import time
import uuid

from .errors import APIError, bad_request
from .logprobs import completion_logprobs
from .protocol import CompletionRequest
from .serving import SSE_DONE, Serving, sse, usage


def prompt_ids(serving: Serving, prompt) -> list[list[int]]:
    """The request's prompts as token-id lists: a string, a list of strings, a list of ids, or a list of those."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("prompt is empty", param="prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if serving.tokenizer is None:
                raise bad_request("this model has no tokenizer: send the prompt as token ids", param="prompt")
            p = serving.tokenizer.encode(p)
        serving.check_prompt(p, "the prompt" if len(prompts) == 1 else f"prompt {i}")
        out.append(p)
    return out


async def completion(serving: Serving, req: CompletionRequest):
    """Validate, submit; returns (group, response dict or async iterator of SSE strings)."""
    serving.check_request(req)
    prompts = prompt_ids(serving, req.prompt)
    if len(prompts) * req.n > serving.config.max_n * 4:
        raise bad_request(f"{len(prompts)} prompts x n={req.n} is more than this server's limit of "
                          f"{serving.config.max_n * 4} choices per request (4 x --max-n)", param="prompt")
    params = []
    for p in prompts:
        base = serving.sampling_params(req, len(p), req.max_tokens, req.logprobs)
        for i in range(req.n):
            params.append(base if base.seed is None else dataclasses.replace(base, seed=(base.seed + i) % 2**32))
    group = await serving.start([p for p in prompts for _ in range(req.n)], params)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        return group, _stream(serving, req, group, meta, prompt_tokens)
    try:
        outs = await group.final()
    finally:
        group.abort()
    choices = []
    for i, out in enumerate(outs):
        c = out.outputs[0]
        choice = {"index": i, "text": c.text or "", "logprobs": None, "finish_reason": c.finish_reason}
        if c.stop_reason is not None:
            choice["stop_reason"] = c.stop_reason
        if req.logprobs is not None:
            choice["logprobs"] = completion_logprobs(serving.tokenizer, c.token_ids, c.logprobs, req.logprobs)
        if req.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
        choices.append(choice)
    completion_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return group, {**meta, "object": "text_completion", "choices": choices,
                   "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


async def _stream(serving, req, group, meta, prompt_tokens):
    """SSE chunks with each choice's new text (and tokens), its finish reason, the usage chunk if asked, `[DONE]`."""
    head = {**meta, "object": "text_completion", "system_fingerprint": None}
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    usage_field = {"usage": None} if include_usage else {}
    n = len(group.ids)
    sent_text, sent_tokens = [0] * n, [0] * n
    try:
        async for changed in group.updates():
            for i in changed:
                c = group.latest[i].outputs[0]
                text, lo = c.text or "", sent_tokens[i]
                choice = {"index": i, "text": text[sent_text[i]:], "logprobs": None, "finish_reason": c.finish_reason}
                if req.logprobs is not None and len(c.token_ids) > lo:
                    choice["logprobs"] = completion_logprobs(serving.tokenizer, c.token_ids[lo:], c.logprobs[lo:],
                                                             req.logprobs, offset=sent_text[i])
                if req.return_token_ids:
                    choice["token_ids"] = list(c.token_ids[lo:])
                if c.stop_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                sent_text[i], sent_tokens[i] = len(text), len(c.token_ids)
                yield sse({**head, "choices": [choice], **usage_field})
        if include_usage:
            completion_tokens = sum(len(o.outputs[0].token_ids) for o in group.latest)
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield SSE_DONE
    except Exception as e:  # headers are sent: report the failure in the stream
        err = e if isinstance(e, APIError) else APIError(500, f"{type(e).__name__}: {e}")
        yield sse(err.body())
        yield SSE_DONE
    finally:
        group.abort()
