"""The OpenAI request bodies the server accepts, as strict pydantic models with OpenAI's field names.

Strict: a wrong JSON type is an error, not coerced ("0.5" is not a number); unknown fields are errors, as OpenAI
answers them. Fields that OpenAI has and the engine does not honour are accepted only at their neutral value
(`check_unsupported`), so nobody gets silently ignored settings. Responses are plain dicts built in responses.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NonNegInt = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ImageUrl(_Strict):
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None
    image_url: ImageUrl | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object as a string, as OpenAI sends it


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2] (SamplingParams checks the ranges)
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None  # vLLM's extension (HF's semantics); None: generation_config.json's
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    return_token_ids: bool = False  # vLLM's extension: each choice carries its generated token ids


def check_unsupported(req: _Sampling) -> list[tuple[str, str]]:
    """(field, why) for each OpenAI field set to something this server does not do."""
    bad = []
    if req.logit_bias:
        bad.append(("logit_bias", "logit_bias is not supported"))
    if isinstance(req, ChatCompletionRequest):
        if req.response_format is not None and req.response_format.type != "text":
            bad.append(("response_format", f"response_format {req.response_format.type!r} is not supported "
                                           "(only 'text': no constrained decoding)"))
        if req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice):
            bad.append(("tool_choice", "tool_choice 'required' or a named function is not supported (no "
                                       "constrained decoding); use 'auto' or 'none'"))
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                bad.append((f"messages[{i}].content", "only text content parts are supported"))
    else:
        if req.echo:
            bad.append(("echo", "echo is not supported"))
        if req.suffix:
            bad.append(("suffix", "suffix is not supported"))
        if req.best_of not in (None, 1, req.n):
            bad.append(("best_of", "best_of other than n is not supported"))
    return bad
