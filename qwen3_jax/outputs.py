"""What the engine returns per request, with vLLM's names: `RequestOutput` holding one `CompletionOutput`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    """One generated continuation. `logprobs[i]` maps token id -> log-probability for the i-th generated token:
    the chosen token first, then the requested number of most likely tokens."""

    index: int
    text: str | None  # None when the model has no tokenizer
    token_ids: list[int]
    # "stop" (EOS, a stop token or string), "length" (max_tokens or max_model_len), "abort", or "error" (the model's
    # logits were NaN or Inf: the request stopped before that token)
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (None for EOS / length)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float  # time.monotonic() seconds
    first_token_time: float | None
    finished_time: float | None
    num_cached_tokens: int  # prompt tokens found in the prefix cache
    num_preemptions: int

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step (cumulative: all tokens so far). The flat properties read the single
    completion: `out.text` is `out.outputs[0].text`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None  # None for the first prompt token
    metrics: RequestMetrics | None = None
    prompt: str | None = None

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs
