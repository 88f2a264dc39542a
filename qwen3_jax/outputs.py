"""What the engine returns per request, with vLLM's names: `RequestOutput` holding one `CompletionOutput`; and
`OutputText`, a request's text as its tokens arrive (detokenized incrementally, ended at a stop string)."""

from __future__ import annotations

import dataclasses

from .tokenizer import StreamDecoder, Tokenizer


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


class OutputText:
    """A request's generated text, token by token: detokenized as the tokens arrive (special tokens skipped) and
    cut at the earliest of the `stop` strings, which may span several tokens."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), include_stop: bool = False):
        self._decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.stop, self.include_stop = stop, include_stop
        self.text = ""

    def add(self, token: int, last: bool = False) -> str | None:
        """Add a token's text (`last`: the request ends with it, so nothing stays buffered); returns the stop
        string it completed, the text then ending before it (or after it, with `include_stop`), else None."""
        new = self._decoder.add([token]) + (self._decoder.flush() if last else "")
        self.text += new
        return self._cut_at_stop(len(new)) if new and self.stop else None

    def flush(self) -> None:
        """The request ended without a further token: the text buffered for a partial character, as it is."""
        self.text += self._decoder.flush()

    def visible(self, finished: bool) -> str:
        """The text to show now: while running, less what may be the start of a stop string, so streamed text
        never has to be taken back."""
        if finished or not self.stop:
            return self.text
        return self.text[:max(0, len(self.text) - max(len(s) for s in self.stop) + 1)]

    def _cut_at_stop(self, num_new: int) -> str | None:
        longest = max(len(s) for s in self.stop)
        start = max(0, len(self.text) - num_new - longest + 1)  # a match must end in the new characters
        found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not found:
            return None
        i, stop = min(found)
        self.text = self.text[:i + len(stop)] if self.include_stop else self.text[:i]
        return stop
