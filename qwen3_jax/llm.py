"""`LLM`: offline batched generation on the engine, with vLLM's interface.

    llm = LLM("path/to/Qwen3-0.6B", max_num_seqs=64)
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].text, outs[0].finish_reason)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import distributed
from .engine import LLMEngine, engine_options
from .generate import Qwen3, load
from .outputs import RequestOutput
from .sampling import SamplingParams


class LLM:
    """A loaded model and its engine. `model` is a checkpoint directory or an already loaded `Qwen3`;
    `quantize` ('int8', 'int4'), `modules_to_not_convert`, `tensor_parallel` and `devices` as in `load`;
    `options` are `EngineOptions` fields (max_num_seqs, max_model_len, num_blocks, ...)."""

    def __init__(self, model, *, dtype: str | None = None, kernels="auto", quantize: str | None = None,
                 modules_to_not_convert: tuple[str, ...] = (), tensor_parallel: int | None = None, devices=None,
                 **options):
        if isinstance(model, Qwen3):
            if dtype is not None or quantize is not None or tensor_parallel is not None or devices is not None:
                raise ValueError("dtype, quantize, tensor_parallel and devices apply when loading a checkpoint; this "
                                 "model is already loaded")
            self.model = model
        else:
            self.model = load(model, dtype=dtype, kernels=kernels, quantize=quantize,
                              modules_to_not_convert=modules_to_not_convert, tensor_parallel=tensor_parallel,
                              devices=devices)
        self.engine = LLMEngine(self.model, engine_options(**options))
        parallel = self.model.parallel
        self.multi_process = parallel is not None and parallel.mesh.is_multi_process
        if self.multi_process and distributed.is_leader():
            self.engine = distributed.LockstepEngine(self.engine)

    def follow(self) -> None:
        """On a process other than 0 of a multi-process model: step with process 0 until it calls `shutdown`."""
        distributed.follow(self.engine)

    def shutdown(self) -> None:
        """On process 0 of a multi-process model: release the other processes (their `follow` returns)."""
        if isinstance(self.engine, distributed.LockstepEngine):
            self.engine.shutdown()

    def get_tokenizer(self):
        return self.model.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True,
                 on_output: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or a chat message list), in order. `sampling_params`: one
        for all prompts or one per prompt (default: the checkpoint's generation_config.json, max_tokens 16).
        `on_output(i, output)` sees prompt i's output after every step that changed it (streaming)."""
        if self.multi_process and not distributed.is_leader():
            raise RuntimeError("this process follows process 0, which takes the prompts: call llm.follow() here")
        prompts = _as_prompt_list(prompts)
        ids = [self._token_ids(p) for p in prompts]
        params = self._params_list(sampling_params, len(ids))
        outs = self.engine.generate(ids, params, use_tqdm=use_tqdm, on_output=on_output)
        for prompt, out in zip(prompts, outs):
            out.prompt = prompt if isinstance(prompt, str) else None
        return outs

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             enable_thinking: bool | None = None, tools: list[dict] | None = None, use_tqdm: bool = True,
             on_output: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or a list of them,
        rendered with the checkpoint's chat template (Qwen3's `enable_thinking` switch, optional `tools`)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts = [self.model.chat_prompt(m, enable_thinking=enable_thinking, tools=tools) for m in conversations]
        return self.generate(texts, sampling_params, use_tqdm=use_tqdm, on_output=on_output)

    def _token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.model._require_tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._token_ids(prompt["prompt"])
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self._token_ids(self.model.chat_prompt(list(prompt)))
        return list(prompt)

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.model.default_sampling()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if not isinstance(sampling_params, Sequence) or isinstance(sampling_params, str):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        if len(sampling_params) != n:
            raise ValueError(f"{len(sampling_params)} sampling params for {n} prompts: give one, or one per prompt")
        bad = [type(p).__name__ for p in sampling_params if not isinstance(p, SamplingParams)]
        if bad:
            raise TypeError(f"sampling_params entries must be SamplingParams, got {bad[0]}")
        return list(sampling_params)


def _as_prompt_list(prompts) -> list:
    """One prompt (text, token ids, a chat message list, or a {'prompt_token_ids': ...} dict) or a list of them
    -> a list of prompts."""
    if prompts is None:
        raise TypeError("prompts must be a string, a list of token ids, or a list of such prompts; got None")
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a list of token ids, or a list of such prompts; got "
                        f"{type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]  # one token-id prompt
    if isinstance(prompts[0], dict) and "role" in prompts[0]:
        return [list(prompts)]  # one chat conversation
    return list(prompts)
