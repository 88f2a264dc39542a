"""The Hugging Face transformers engines that scripts/benchmark.py runs beside ours, on the very same weights.

`hf_model_from_params` builds a transformers Qwen3ForCausalLM whose parameters are DLPack views of the JAX arrays
(no copy on a GPU). `HFGenerate` times `generate` in eager mode (dynamic cache) or with a static cache, which
transformers compiles itself (hf-eager, hf-compile). `HFContinuousBatching` runs transformers' continuous batching
(hf-cb) through its request API: `init_continuous_batching`, then `add_request(ids, max_new_tokens=n)` per request
(the per-request output length that `generate_batch` cannot take), which is the manager `generate_batch` itself runs.
torch and transformers are imported when an engine is built, so the JAX rows run before torch does anything.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.config import Qwen3Config
from qwen3_jax.weights import hf_shapes, weight_table

from bench_harness import time_calls

CB_BLOCK = 256  # transformers' continuous-batching KV block (its default block_size in 5.17 and 5.24)


def hf_config(config: Qwen3Config):
    """The transformers Qwen3Config for our config (sdpa attention, no EOS)."""
    from transformers import Qwen3Config as HFQwen3Config

    rope = config.rope_parameters()
    return HFQwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope, max_window_layers=config.num_hidden_layers, use_sliding_window=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )


def _to_torch(x: jax.Array, device: str):
    """A torch view of a JAX array on the same device (DLPack, no copy), else a copy through host memory."""
    import torch

    platform = next(iter(x.devices())).platform
    if (platform == "gpu") == (device == "cuda"):
        return torch.from_dlpack(x)
    dtype = getattr(torch, str(x.dtype))
    return torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(device=device, dtype=dtype)


def hf_model_from_params(config: Qwen3Config, params: dict, device: str):
    """A transformers Qwen3ForCausalLM whose weights are the JAX params (q/k/v and gate/up unfused as views)."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    cfg = hf_config(config)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    shapes = hf_shapes(config)
    for path, (keys, _) in weight_table(config).items():
        value = params
        for part in path:
            value = value[part]
        tensor = _to_torch(value, device)
        parts = torch.split(tensor, [shapes[k][0] for k in keys], dim=0) if len(keys) > 1 else (tensor,)
        for key, part in zip(keys, parts):
            module, name = key.rsplit(".", 1)
            model.get_submodule(module)._parameters[name] = torch.nn.Parameter(part, requires_grad=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"HF model tensors left without weights: {left[:5]}")
    model.generation_config = GenerationConfig(do_sample=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return model.eval()


class _Torch:
    def __init__(self, name: str, model, device: str, shared_bytes: int):
        import torch

        self.name, self.model, self.device, self.shared_bytes = name, model, device, shared_bytes
        self.cuda = device == "cuda"
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def _peak(self, row: dict) -> dict:
        if self.cuda:  # torch's own allocations + the weights it shares with JAX
            row["peak_bytes"] = self.torch.cuda.max_memory_allocated() + self.shared_bytes
        return row


class HFGenerate(_Torch):
    """transformers' generate in eager mode (dynamic cache) or with a static cache and its automatic torch.compile."""

    def __init__(self, name: str, model, device: str, shared_bytes: int):
        super().__init__(name, model, device, shared_bytes)
        self.static = name == "hf-compile"

    def _generate(self, ids, n: int) -> tuple[float, float]:
        """(time to first token, decode seconds for the other n-1 tokens) of one generate call."""
        from transformers import LogitsProcessor, LogitsProcessorList

        sync, stamp = self.sync, {}

        class FirstLogits(LogitsProcessor):  # runs right after the prefill forward: the prefill's end
            def __call__(self, input_ids, scores):
                if "t" not in stamp:
                    sync()
                    stamp["t"] = time.perf_counter()
                return scores

        extra = {}
        if self.static:  # transformers compiles the decode step itself for a static cache: one graph per shape
            from transformers import CompileConfig

            extra = {"cache_implementation": "static",
                     "compile_config": CompileConfig(fullgraph=True, dynamic=False)}
        sync()
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                                  do_sample=False, logits_processor=LogitsProcessorList([FirstLogits()]), **extra)
        sync()
        t1 = time.perf_counter()
        want = (ids.shape[0], ids.shape[1] + n)
        if tuple(out.shape) != want:
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {want} (stopped early?)")
        return stamp["t"] - t0, t1 - stamp["t"]

    def _prefill(self, ids):
        """The first token of each row, on the host (so the call has finished when it returns)."""
        with self.torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            return logits[:, -1].argmax(-1).cpu()

    def run(self, kind: str, ids: np.ndarray, new_tokens: int, reps: int, cap_s: float) -> dict:
        """A decode (greedy, `new_tokens` per row) or prefill (first token only) row for the prompts `ids` [B, P]."""
        self._reset_peak()
        ids = self.torch.as_tensor(ids, dtype=self.torch.long, device=self.device)
        row = {}
        if kind == "prefill":
            self.sync()
            row["warmup_s"] = time_calls(lambda: self._prefill(ids), 1, warmup=0)[0]
            times = time_calls(lambda: self._prefill(ids), reps, warmup=0)
            row.update(new_tokens=1, ttft_s=statistics.median(times), prefill_s_all=times)
            return self._peak(row)
        t = time.perf_counter()
        if self.static:  # compile at the full cache length, then a second call so CUDA graphs are recorded
            self._generate(ids, new_tokens)
            probe_steps = min(new_tokens, 16) - 1
            _, probe_s = self._generate(ids, probe_steps + 1)
        else:  # the first call is cold: time the second
            probe_steps = min(new_tokens, 8) - 1
            for _ in range(2):
                _, probe_s = self._generate(ids, probe_steps + 1)
        row["warmup_s"] = time.perf_counter() - t
        n = new_tokens
        step_s = probe_s / max(probe_steps, 1)
        if cap_s and step_s * (n - 1) > cap_s:  # slow engine: fewer new tokens per timed run
            n = max(16, min(n, int(cap_s / step_s) + 1))
        runs = [self._generate(ids, n) for _ in range(reps)]
        row.update(new_tokens=n, ttft_s=statistics.median(r[0] for r in runs),
                   decode_s=statistics.median(r[1] for r in runs), decode_steps=n - 1,
                   decode_s_all=[r[1] for r in runs], prefill_s_all=[r[0] for r in runs])
        if n < new_tokens:
            row["note"] = f"{n} of {new_tokens} new tokens (slow)"
        return self._peak(row)


class HFContinuousBatching(_Torch):
    """transformers' continuous batching with its defaults (paged attention on the model's sdpa; CUDA graphs and
    compilation as it decides), every request's own max_new_tokens, EOS off."""

    def _manager(self, requests: list[tuple[list[int], int]], temperature: float):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        gen = GenerationConfig(max_new_tokens=16, eos_token_id=-1, pad_token_id=0, **sample)  # -1: no EOS
        # generate_batch sizes the batch for its requests the same way (max_requests_per_batch <= 1024)
        cb = {"max_requests_per_batch": min(len(requests), 1024)}
        if not self.cuda:  # else its cache takes 60% of the machine's RAM: here, room for every request at once
            cb["num_blocks"] = sum(-(-(len(p) + n) // CB_BLOCK) for p, n in requests) + 1
        return self.model.init_continuous_batching(generation_config=gen,
                                                   continuous_batching_config=ContinuousBatchingConfig(**cb))

    @staticmethod
    def _serve(manager, requests: list[tuple[list[int], int]], tag: str) -> tuple[float, list]:
        """Submit all `requests` (prompt ids, new tokens) at once -> (seconds until the last finished, outputs)."""
        t0 = time.perf_counter()
        ids = [manager.add_request(p, request_id=f"{tag}-{i}", max_new_tokens=n, eos_token_id=-1)
               for i, (p, n) in enumerate(requests)]
        done = {}
        while len(done) < len(ids):
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError(f"transformers' generation thread stopped with {len(ids) - len(done)} "
                                       "requests unfinished")
            elif out.is_finished():
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id}: {out.error}")
                done[out.request_id] = out
        seconds = time.perf_counter() - t0
        return seconds, [done[i] for i in ids]

    def throughput(self, warm: list[tuple[list[int], int]], timed: list[tuple[list[int], int]],
                   temperature: float = 0.0) -> dict:
        """Serve `warm` (untimed), then `timed`: every request submitted at once, timed until the last finishes."""
        self._reset_peak()
        row = {"free_bytes": self.torch.cuda.mem_get_info()[0]} if self.cuda else {}
        t = time.perf_counter()
        manager = self._manager(timed, temperature)
        row["attention"] = self.model.config._attn_implementation  # what transformers switched to (paged|sdpa, ...)
        try:
            if self.cuda:
                manager.warmup()  # what generate_batch does first (CUDA graphs, where it uses them)
            manager.start()
            self._serve(manager, warm, "warm")
            row["warmup_s"] = time.perf_counter() - t
            seconds, outs = self._serve(manager, timed, "run")
        finally:
            manager.stop(block=True)
            manager.destroy()
        got = [len(o.generated_tokens) for o in outs]
        want = [n for _, n in timed]
        if got != want:
            bad = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
            raise RuntimeError(f"request {bad} returned {got[bad]} tokens, asked for {want[bad]}")
        row.update(run_s=seconds, output_tokens=sum(got), prompt_tokens=sum(len(p) for p, _ in timed))
        return self._peak(row)
