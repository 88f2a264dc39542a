"""Tensor parallelism: the model over a 1-D device mesh (axis "tp"), in Megatron's layout, through jax.sharding.

Layout, stated once (`LOGICAL_AXES` names each param's dims, `RULES` maps those names onto the mesh):
- qkv_proj and gate_up_proj are split by output: device s holds its query heads, the key and value heads they read,
  and its gate and up columns. The fused rows are reordered at load so each device's part is contiguous:
  [q heads of s; k heads of s; v heads of s] and [gate rows of s; up rows of s] (`shard_pieces`).
- o_proj and down_proj are split by input; each device's partial product is summed by one all-reduce (in f32,
  cast after, so the result rounds as one unsplit matmul does).
- embed_tokens and lm_head are split over the vocabulary, padded to a multiple of N with zero rows: the lookup
  masks other devices' rows and all-reduces, the logits are all-gathered and cut back to the vocabulary.
- Norms are replicated; so is everything sampling sees: it runs on the full logits, the same on every device.
- The KV pool is split over KV heads. With fewer KV heads than devices, each KV head is replicated N / KV times
  (vLLM's rule): device s holds KV head s * KV // N, the one its query heads read. N must divide the query heads
  and the MLP width, and either divide the KV heads or be a multiple of them.

Under `jax.shard_map` every device runs `model.forward` on its local shards with a per-device config
(`local_config`): the Pallas kernels see local shapes and know nothing of the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import model
from .config import Qwen3Config
from .kv_cache import AttentionMetadata, KVCache
from .ops import Kernels
from .quantize import QuantizedWeight, TiedEmbedding
from .weights import weight_table

AXIS = "tp"

# Each param's dims as logical axes (params keep nn.Linear's [out, in] layout), and the KV pool's.
LOGICAL_AXES = {
    "embed_tokens": ("vocab", "embed"), "lm_head": ("vocab", "embed"),
    "qkv_proj": ("heads", "embed"), "o_proj": ("embed", "heads"),
    "gate_up_proj": ("mlp", "embed"), "down_proj": ("embed", "mlp"),
    "norm": ("embed",), "input_layernorm": ("embed",), "post_attention_layernorm": ("embed",),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
}
CACHE_AXES = ("blocks", "kv_heads", "block_positions", "head_dim")
# Logical axis -> mesh axis; axes not named here are replicated.
RULES = {"vocab": AXIS, "heads": AXIS, "mlp": AXIS, "kv_heads": AXIS}


def logical_spec(axes: Sequence[str]) -> P:
    return P(*(RULES.get(a) for a in axes))


def _sharded_dim(name: str) -> int | None:
    """The dim of param `name` that is split over the devices (None: replicated)."""
    dims = [i for i, a in enumerate(LOGICAL_AXES[name]) if RULES.get(a) == AXIS]
    return dims[0] if dims else None


def check_parallel_config(config: Qwen3Config, size: int) -> None:
    """Refuse a device count the model's shapes cannot be split over, naming the field."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, got {size!r}")
    heads, kv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if heads % size:
        raise ValueError(f"tensor_parallel={size} does not divide num_attention_heads={heads}: each device holds "
                         "whole query heads")
    if kv % size and size % kv:
        raise ValueError(f"tensor_parallel={size} and num_key_value_heads={kv}: the devices must split the KV heads "
                         "evenly, or (with fewer KV heads than devices) be a multiple of them so that each KV head "
                         "is replicated on the same number of devices")
    if inter % size:
        raise ValueError(f"tensor_parallel={size} does not divide intermediate_size={inter}")


def kv_heads_of(config: Qwen3Config, size: int, s: int) -> range:
    """The KV heads device s of `size` holds: its share, or with fewer KV heads than devices the one its query
    heads read (KV head s * KV // size, replicated size / KV times)."""
    kv = config.num_key_value_heads
    if size <= kv:
        per = kv // size
        return range(s * per, (s + 1) * per)
    return range(s * kv // size, s * kv // size + 1)


def local_config(config: Qwen3Config, size: int) -> Qwen3Config:
    """The config of one device's part of the model: its heads, KV heads, MLP width and vocabulary rows."""
    return config.replace(num_attention_heads=config.num_attention_heads // size,
                          num_key_value_heads=len(kv_heads_of(config, size, 0)),
                          intermediate_size=config.intermediate_size // size,
                          vocab_size=-(-config.vocab_size // size))


def shard_pieces(name: str, config: Qwen3Config, size: int, s: int) -> list[tuple[int, tuple]]:
    """Device s's part of param `name`: (index of the HF tensor among those fused into it, the index into that
    tensor) for each piece, concatenated along dim 0 in this order (and zero-padded to the local shape: the
    vocabulary's last rows)."""
    d, full = config.head_dim, slice(None)
    heads = config.num_attention_heads // size * d
    inter = config.intermediate_size // size
    if name == "qkv_proj":
        kv = kv_heads_of(config, size, s)
        rows = slice(kv.start * d, kv.stop * d)
        return [(0, (slice(s * heads, (s + 1) * heads), full)), (1, (rows, full)), (2, (rows, full))]
    if name == "gate_up_proj":
        rows = slice(s * inter, (s + 1) * inter)
        return [(0, (rows, full)), (1, (rows, full))]
    if name == "o_proj":
        return [(0, (full, slice(s * heads, (s + 1) * heads)))]
    if name == "down_proj":
        return [(0, (full, slice(s * inter, (s + 1) * inter)))]
    if name in ("embed_tokens", "lm_head"):
        vocab = -(-config.vocab_size // size)
        return [(0, (slice(min(s * vocab, config.vocab_size), min((s + 1) * vocab, config.vocab_size)), full))]
    return [(0, (full,))]


def hf_parts(name: str, config: Qwen3Config) -> list[int]:
    """Row offsets at which our fused param `name` splits back into its HF tensors."""
    if name == "qkv_proj":
        return [config.q_size, config.q_size + config.kv_size]
    if name == "gate_up_proj":
        return [config.intermediate_size]
    return []


@dataclasses.dataclass(frozen=True, eq=False)
class TensorParallel:
    """The device mesh a model runs on (`size` devices on axis "tp"), and how its arrays lie on it."""

    mesh: Mesh

    @classmethod
    def create(cls, config: Qwen3Config, size: int, devices: Sequence | None = None) -> "TensorParallel":
        """A 1-D mesh over `size` devices for a model of `config` (refused if its shapes do not split over them):
        the given devices (jax devices or their ids), else the first `size`."""
        check_parallel_config(config, size)
        available = jax.devices()
        if devices is None:
            if size > len(available):
                raise ValueError(f"tensor_parallel={size} needs {size} devices, but JAX sees {len(available)} "
                                 f"({available[0].platform}): lower it, or make more devices visible")
            chosen = available[:size]
        else:
            by_id = {d.id: d for d in available}
            chosen = []
            for d in devices:
                if isinstance(d, jax.Device):
                    chosen.append(d)
                elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and int(d) in by_id:
                    chosen.append(by_id[int(d)])
                else:
                    raise ValueError(f"device {d!r} is not one of the devices JAX sees (ids "
                                     f"{sorted(by_id)})")
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"devices {list(devices)!r} names a device twice")
            if len(chosen) != size:
                raise ValueError(f"tensor_parallel={size} but devices lists {len(chosen)}: give one id per device")
        return cls(Mesh(np.array(chosen), (AXIS,)))

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)

    @property
    def local_devices(self) -> list:
        """The mesh's devices this process drives."""
        return [d for d in self.devices if d.process_index == jax.process_index()]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def sharding(self, name: str) -> NamedSharding:
        return NamedSharding(self.mesh, logical_spec(LOGICAL_AXES[name]))

    def cache_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, logical_spec(CACHE_AXES))

    def param_specs(self, params: dict):
        """A PartitionSpec per param array, from its name."""
        return _map_named(params, lambda name, _: logical_spec(LOGICAL_AXES[name]))

    def cache_specs(self, cache: KVCache):
        return jax.tree.map(lambda _: logical_spec(CACHE_AXES), cache)

    # ---- placing arrays ------------------------------------------------------------------------------------
    def put(self, tree):
        """Host arrays -> the same value on every device of the mesh (also across processes)."""
        if self.mesh.is_multi_process:
            return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), self.replicated,
                                                                       lambda idx, a=a: np.asarray(a)[idx]), tree)
        return jax.device_put(tree, self.replicated)

    def init_cache(self, config: Qwen3Config, num_blocks: int, block_size: int, dtype=None) -> KVCache:
        """An empty pool split over KV heads: [num_blocks, local KV heads x N, block_size, D] in all."""
        kv_heads = local_config(config, self.size).num_key_value_heads * self.size
        return KVCache.init(config, num_blocks, block_size, dtype, kv_heads=kv_heads, sharding=self.cache_sharding())

    def make_param(self, name: str, config: Qwen3Config, read: Callable[[int, tuple], np.ndarray]):
        """Param `name` on the mesh, each device's part made by `read(part, index)` (a piece of the HF tensor
        `part` of those fused into it) as `shard_pieces` lays it out: nothing holds the whole param at once."""
        local_shape = _local_shapes(config, self.size)[name]
        dim = _sharded_dim(name)
        shape = list(local_shape)
        if dim is not None:
            shape[dim] *= self.size

        def one_device(index):
            s = 0 if dim is None else (index[dim].start or 0) // local_shape[dim]
            pieces = [read(part, idx) for part, idx in shard_pieces(name, config, self.size, s)]
            xp = jnp if isinstance(pieces[0], jax.Array) else np  # device arrays are cut on their device
            pad = local_shape[0] - sum(p.shape[0] for p in pieces)  # the vocabulary's padding rows
            if pad:
                pieces.append(xp.zeros((pad, *pieces[0].shape[1:]), pieces[0].dtype))
            return pieces[0] if len(pieces) == 1 else xp.concatenate(pieces, axis=0)

        return jax.make_array_from_callback(tuple(shape), self.sharding(name), one_device)

    def shard_params(self, params: dict, config: Qwen3Config) -> dict:
        """Params loaded whole (`load_params`, `random_params`) laid out on the mesh (made for `config`)."""
        _refuse_quantized(params)

        def place(name, value):
            cuts = [0, *hf_parts(name, config), value.shape[0]]
            parts = [value[a:b] for a, b in zip(cuts, cuts[1:])]
            return self.make_param(name, config, lambda part, idx: parts[part][idx])

        return _map_named(params, place)

    # ---- the forward pass ----------------------------------------------------------------------------------
    def forward(self, params: dict, tokens, positions, cache: KVCache, meta: AttentionMetadata, *,
                config: Qwen3Config, kernels: Kernels = Kernels(), logits_indices=None):
        """`model.forward` with every device computing its part (its heads, MLP columns and vocabulary rows)
        under shard_map -> (logits [.., V] on every device, cache split over KV heads)."""
        shard = model.Shard(AXIS, config.vocab_size)
        per_device = functools.partial(model.forward, config=local_config(config, self.size), kernels=kernels,
                                       shard=shard)
        cache_specs = self.cache_specs(cache)
        args = [params, tokens, positions, cache, meta] + ([] if logits_indices is None else [logits_indices])

        def run(params, tokens, positions, cache, meta, *indices):
            return per_device(params, tokens, positions, cache, meta, logits_indices=indices[0] if indices else None)

        in_specs = (self.param_specs(params), P(), P(), cache_specs, P()) + (P(),) * (len(args) - 5)
        return jax.shard_map(run, mesh=self.mesh, in_specs=in_specs, out_specs=(P(), cache_specs),
                             check_vma=False)(*args)


@functools.lru_cache(maxsize=8)
def _local_shapes(config: Qwen3Config, size: int) -> dict[str, tuple[int, ...]]:
    """One device's shape of each param, by name (the same in every layer)."""
    return {path[-1]: shape for path, (_, shape) in weight_table(local_config(config, size)).items()}


def _map_named(params: dict, fn):
    """params with each array replaced by fn(its param name, array)."""
    return jax.tree_util.tree_map_with_path(lambda path, a: fn(_name(path), a), params)


def _name(path) -> str:
    key = path[-1]
    return getattr(key, "key", getattr(key, "name", str(key)))


def _refuse_quantized(params: dict) -> None:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, (QuantizedWeight, TiedEmbedding)))
    if any(isinstance(x, (QuantizedWeight, TiedEmbedding)) for x in leaves):
        raise ValueError("tensor parallelism does not yet split quantized weights (int8, int4, FP8, AWQ): load the "
                         "model unquantized, or on one device")
