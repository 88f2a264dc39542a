"""Load a Hugging Face Qwen3 safetensors checkpoint (single file or sharded) straight into the params pytree.

Params keep nn.Linear's [out, in] layout. q/k/v are fused into `qkv_proj` and gate/up into `gate_up_proj` at load
time, so each layer runs two projections instead of five. Every tensor is shape-checked against the config before
its data is read, and every error names the file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .config import Qwen3Config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some exporters add that carry nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """A checkpoint whose tensors do not match the config, or that cannot be read."""


def weight_table(config: Qwen3Config) -> dict[tuple, tuple[list[str], tuple[int, ...]]]:
    """Our param path -> (HF keys concatenated along axis 0, expected shape of the result)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    table = {
        ("embed_tokens",): (["model.embed_tokens.weight"], (config.vocab_size, h)),
        ("norm",): (["model.norm.weight"], (h,)),
    }
    if not config.tie_word_embeddings:
        table[("lm_head",)] = (["lm_head.weight"], (config.vocab_size, h))
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        a = p + "self_attn."
        table[("layers", n, "input_layernorm")] = ([p + "input_layernorm.weight"], (h,))
        table[("layers", n, "qkv_proj")] = (
            [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
            (config.q_size + 2 * config.kv_size, h),
        )
        table[("layers", n, "q_norm")] = ([a + "q_norm.weight"], (d,))
        table[("layers", n, "k_norm")] = ([a + "k_norm.weight"], (d,))
        table[("layers", n, "o_proj")] = ([a + "o_proj.weight"], (h, config.q_size))
        table[("layers", n, "post_attention_layernorm")] = ([p + "post_attention_layernorm.weight"], (h,))
        table[("layers", n, "gate_up_proj")] = ([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], (2 * i, h))
        table[("layers", n, "down_proj")] = ([p + "mlp.down_proj.weight"], (h, i))
    return table


def hf_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor, split back from the fused entries."""
    split = {"q_proj": config.q_size, "k_proj": config.kv_size, "v_proj": config.kv_size,
             "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
    shapes = {}
    for keys, shape in weight_table(config).values():
        for key in keys:
            part = key.split(".")[-2]
            shapes[key] = (split[part], *shape[1:]) if len(keys) > 1 else shape
    return shapes


def _key_to_file(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it, checking that every file exists."""
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = {name: model_dir / name for name in set(weight_map.values())}
        missing = sorted(str(p) for p in files.values() if not p.is_file())
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return {key: files[name] for key, name in weight_map.items()}
    if single.is_file():
        with _open(single) as f:
            return {key: single for key in f.keys()}
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise WeightsError(f"{model_dir}: only PyTorch pickle weights found; convert them to safetensors "
                           "(pickle files are never loaded, they can run code)")
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: cannot read safetensors file ({e})") from None


def load_params(model_dir: str | Path, config: Qwen3Config, *, dtype=None, device=None) -> dict:
    """Read the checkpoint in `model_dir` into the params pytree on `device`, cast to `dtype` (default config's)."""
    model_dir = Path(model_dir)
    dtype = np.dtype(dtype or config.jnp_dtype)
    device = device or jax.devices()[0]
    key_file = _key_to_file(model_dir)
    expected = hf_shapes(config)

    unexpected = [k for k in key_file if k not in expected and not k.endswith(_IGNORED_SUFFIXES)
                  and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        shown = ", ".join(f"'{k}' (in {key_file[k].name})" for k in sorted(unexpected)[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise WeightsError(f"{model_dir}: unexpected tensor(s) for this Qwen3 config: {shown}{more}")
    missing = [k for k in expected if k not in key_file]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(f"{model_dir}: tensor(s) missing from the checkpoint: {shown}")

    handles = {}
    try:
        for path in sorted(set(key_file[k] for k in expected)):
            handles[path] = _open(path)
        for key, shape in expected.items():  # all shapes first: fail before reading gigabytes
            got = tuple(handles[key_file[key]].get_slice(key).get_shape())
            if got != shape:
                raise WeightsError(f"{key_file[key]}: tensor '{key}' has shape {got}, config expects {shape}")

        table = weight_table(config)
        total = sum(int(np.prod(s)) for s in expected.values()) * dtype.itemsize
        params = {"layers": [{} for _ in range(config.num_hidden_layers)]}
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", delay=2.0, leave=False) as bar:
            for path, (keys, _) in table.items():
                arrays = [_read(handles[key_file[k]], k, key_file[k]).astype(dtype, copy=False) for k in keys]
                value = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
                _set(params, path, jax.device_put(value, device))
                bar.update(value.nbytes)
    finally:
        handles.clear()
    return params


def _read(handle, key: str, path: Path) -> np.ndarray:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read tensor '{key}' ({e})") from None


def _set(tree: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def random_params(config: Qwen3Config, seed: int = 0, *, dtype=None) -> dict:
    """Random params at the config's shapes (normal * 0.02, norms near 1), made on the device: for benchmarks."""
    dtype = dtype or config.jnp_dtype
    key = jax.random.key(seed)
    params = {"layers": [{} for _ in range(config.num_hidden_layers)]}
    for n, (path, (_, shape)) in enumerate(weight_table(config).items()):
        k = jax.random.fold_in(key, n)
        if len(shape) == 1:  # norm weights
            value = 1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)
        else:
            value = 0.02 * jax.random.normal(k, shape, jnp.float32)
        _set(params, path, value.astype(dtype))
    return params
