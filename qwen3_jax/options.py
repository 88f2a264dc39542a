"""`EngineOptions`: the engine's settings, with vLLM's names and defaults, validated; and the step sizes
(`buckets`) the engine compiles for them."""

from __future__ import annotations

import dataclasses

from .kv_cache import check_block_size


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Engine settings, with vLLM's names. None picks the default described beside each field."""

    max_model_len: int | None = None  # longest prompt + output; default: the config's context (max_context_len)
    max_num_seqs: int = 256  # most sequences running at once (the largest decode batch)
    max_num_batched_tokens: int = 8192  # token budget of one prefill step (chunked prefill)
    block_size: int = 64  # positions per KV block (a power of two >= 16: one attention key tile)
    num_blocks: int | None = None  # KV blocks in the pool; default: from gpu_memory_utilization on a GPU
    gpu_memory_utilization: float = 0.9  # fraction of the device memory that weights + KV cache + steps may use
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    decode_steps: int = 8  # decode tokens per device call
    precompile: bool = True  # compile every step bucket at start-up (else each on first use)

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"engine option {name} must be a positive integer, got {v!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "decode_steps"):
            positive_int(name)
        for name in ("max_model_len", "num_blocks"):
            if getattr(self, name) is not None:
                positive_int(name)
        check_block_size(self.block_size)
        mem = self.gpu_memory_utilization
        if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not 0 < mem <= 1:
            raise ValueError(f"engine option gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization!r}")


def engine_options(base: EngineOptions | None = None, **changes) -> EngineOptions:
    """`base` (default: the defaults) with `changes`; an unknown option name is an error that lists the known ones."""
    names = [f.name for f in dataclasses.fields(EngineOptions)]
    unknown = [k for k in changes if k not in names]
    if unknown:
        raise TypeError(f"unknown engine option(s) {', '.join(map(repr, unknown))}; EngineOptions has: "
                        f"{', '.join(names)}")
    return dataclasses.replace(base or EngineOptions(), **changes)


def buckets(limit: int, smallest: int, dense_from: int) -> list[int]:
    """Step sizes to compile: from `smallest`, x4 up to `dense_from`, then x2, up to `limit`, and `limit` itself.
    Each bucket is an executable compiled at start-up (several seconds each), so small sizes, where padding a step
    costs little (decode rows are weight-bandwidth bound; a short prefill is quick), are spaced wider."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 4 if b < dense_from else 2
    return out + [limit]
