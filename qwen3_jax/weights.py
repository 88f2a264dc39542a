"""Load a Hugging Face Qwen3 safetensors checkpoint (single file or sharded) straight into the params pytree.

Params keep nn.Linear's [out, in] layout. q/k/v are fused into `qkv_proj` and gate/up into `gate_up_proj` at load
time, so each layer runs two projections instead of five. Every tensor is shape-checked against the config before
its data is read, and every error names the file and the tensor.

Quantized weights (`quantize.py`): `quantize="int8" | "int4"` quantizes every linear layer as it is read (the
modules named in `modules_to_not_convert` stay unquantized); checkpoints whose config.json carries a
`quantization_config` are read as published: Qwen's fine-grained FP8 (`quant_method: fp8`) and AutoAWQ GEMM int4
(`quant_method: awq`). Every tensor's stored dtype is checked against what the checkpoint's format says before
its data is read: nothing is cast between integer, fp8 and float types.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import quantize as qz
from .config import Qwen3Config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some exporters add that carry nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FLOAT_STORAGE = ("BF16", "F16", "F32")  # safetensors dtype names of the float tensors we read (and may cast)
# The quantization_config fields we read, per method; any other field is refused rather than ignored.
_FP8_FIELDS = {"quant_method", "activation_scheme", "weight_block_size", "fmt", "scale_fmt", "modules_to_not_convert"}
_AWQ_FIELDS = {"quant_method", "bits", "group_size", "zero_point", "version", "format", "modules_to_not_convert",
               "backend"}


class WeightsError(ValueError):
    """A checkpoint whose tensors do not match the config, or that cannot be read."""


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint's `quantization_config`: 'fp8' (block [bn, bk]) or 'awq' (4 bits, `group_size`, zero points)."""

    method: str
    block: tuple[int, int] = (0, 0)
    group_size: int = 0
    modules_to_not_convert: tuple[str, ...] = ()

    def converts(self, module: str) -> bool:
        """Whether the checkpoint stores this linear module quantized (transformers never converts lm_head)."""
        return module != "lm_head" and qz.should_convert(module, self.modules_to_not_convert)


def checkpoint_quantization(model_dir: str | Path) -> CheckpointQuantization | None:
    """Read and validate config.json's `quantization_config` (None when there is none); anything but Qwen's FP8
    and AutoAWQ GEMM int4 is refused by name."""
    path = Path(model_dir) / "config.json"
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise WeightsError(f"{path}: cannot read config.json ({e})") from None
    if qc is None:
        return None
    where = f"{path}: quantization_config"
    if not isinstance(qc, dict):
        raise WeightsError(f"{where} must be an object, got {qc!r}")
    method = qc.get("quant_method")
    fields = {"fp8": _FP8_FIELDS, "awq": _AWQ_FIELDS}.get(method)
    if fields is None:
        raise WeightsError(f"{where}.quant_method {method!r} is not supported: this engine reads 'fp8' (Qwen's "
                           "block-wise FP8) and 'awq' (AutoAWQ GEMM int4) checkpoints")
    unknown = sorted(set(qc) - fields)
    if unknown:
        raise WeightsError(f"{where}: field(s) {', '.join(unknown)} not understood for quant_method {method!r}")
    skip = qc.get("modules_to_not_convert") or ()
    if not isinstance(skip, (list, tuple)) or not all(isinstance(m, str) for m in skip):
        raise WeightsError(f"{where}.modules_to_not_convert must be a list of module names, got {skip!r}")

    def need(field, ok, default=None):
        value = qc.get(field, default)
        if not ok(value):
            raise WeightsError(f"{where}.{field} = {value!r} is not supported for quant_method {method!r}")
        return value

    if method == "fp8":
        need("activation_scheme", lambda v: v == "dynamic", "dynamic")
        need("fmt", lambda v: v == "e4m3", "e4m3")
        need("scale_fmt", lambda v: v == "float", "float")
        block = need("weight_block_size", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                     and all(isinstance(b, int) and not isinstance(b, bool) and b >= 32 and b % 32 == 0 and
                             b & (b - 1) == 0 for b in v))
        return CheckpointQuantization("fp8", block=tuple(block), modules_to_not_convert=tuple(skip))
    need("bits", lambda v: v == 4)
    need("zero_point", lambda v: v is True, True)
    version = qc.get("version", qc.get("format", "gemm"))
    if not isinstance(version, str) or version.lower() != "gemm":
        raise WeightsError(f"{where}.version = {version!r} is not supported: only AWQ's GEMM packing is read")
    group = need("group_size", lambda v: v in (32, 64, 128))
    return CheckpointQuantization("awq", group_size=group, modules_to_not_convert=tuple(skip))


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


def _is_linear(key: str) -> bool:
    return key.endswith("_proj.weight") or key == "lm_head.weight"


def checkpoint_tensors(config: Qwen3Config, quant: CheckpointQuantization | None) -> dict[str, tuple[tuple, tuple]]:
    """Every tensor the checkpoint must hold: name -> (shape, safetensors dtypes it may be stored in)."""
    out = {}
    for key, (n, *rest) in hf_shapes(config).items():
        module = key[: -len(".weight")]
        if quant is None or not _is_linear(key) or not quant.converts(module):
            out[key] = ((n, *rest), FLOAT_STORAGE)
            continue
        k = rest[0]
        if quant.method == "fp8":
            bn, bk = quant.block
            out[key] = ((n, k), ("F8_E4M3",))
            out[module + ".weight_scale_inv"] = ((-(-n // bn), -(-k // bk)), FLOAT_STORAGE)
        else:
            g = quant.group_size
            if n % 8 or k % g:
                raise WeightsError(f"AWQ packs 8 output channels per int32 in groups of {g} inputs: {module} "
                                   f"[{n}, {k}] does not divide")
            out[module + ".qweight"] = ((k, n // 8), ("I32",))
            out[module + ".qzeros"] = ((k // g, n // 8), ("I32",))
            out[module + ".scales"] = ((k // g, n), FLOAT_STORAGE)
    return out


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


def load_params(model_dir: str | Path, config: Qwen3Config, *, dtype=None, device=None, quantize: str | None = None,
                modules_to_not_convert: tuple[str, ...] = (), parallel=None) -> dict:
    """Read the checkpoint in `model_dir` into the params pytree on `device`, cast to `dtype` (default config's).

    `quantize` ('int8', 'int4') quantizes every linear layer but those `modules_to_not_convert` names (HF module
    names or patterns, as transformers matches them: 'lm_head', 'mlp.down_proj', 'model.layers.0'). FP8 and AWQ
    checkpoints (config.json `quantization_config`) load quantized as published.

    With `parallel` (a `parallel.TensorParallel`) the params are laid out over its devices, each device's part
    read as slices of the tensors (`TensorParallel.make_param`): no device or host holds a whole sharded tensor."""
    model_dir = Path(model_dir)
    dtype = np.dtype(dtype or config.jnp_dtype)
    device = device or jax.devices()[0]
    quant = checkpoint_quantization(model_dir)
    if quantize is not None and quantize not in qz.QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {qz.QUANTIZE_MODES} or None, got {quantize!r}")
    if quantize is not None and quant is not None:
        raise WeightsError(f"{model_dir}: the checkpoint is already quantized ({quant.method}); load it without "
                           f"quantize={quantize!r}")
    if parallel is not None and (quantize is not None or quant is not None):
        what = f"quantize={quantize!r}" if quantize is not None else f"this {quant.method} checkpoint"
        raise WeightsError(f"{model_dir}: tensor parallelism does not yet split quantized weights ({what}); load "
                           "a bf16 checkpoint, or run on one device")
    key_file = _key_to_file(model_dir)
    expected = checkpoint_tensors(config, quant)

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
        for key, (shape, stored) in expected.items():  # all shapes and dtypes first: fail before reading gigabytes
            info = handles[key_file[key]].get_slice(key)
            got = tuple(info.get_shape())
            if got != shape:
                raise WeightsError(f"{key_file[key]}: tensor '{key}' has shape {got}, config expects {shape}")
            if info.get_dtype() not in stored:
                fmt = f"{quant.method} checkpoint" if quant else "checkpoint without a quantization_config"
                raise WeightsError(f"{key_file[key]}: tensor '{key}' is stored as {info.get_dtype()}, but in this "
                                   f"{fmt} it must be {' or '.join(stored)} (nothing is cast between integer, "
                                   "fp8 and float types)")

        def read(key):
            return _read(handles[key_file[key]], key, key_file[key])

        def read_float(key, index=None):  # cast to dtype, NaN / Inf refused by name
            a = read(key) if index is None else _read_slice(handles[key_file[key]], key, key_file[key], index)
            a = a.astype(dtype, copy=False)
            if not _all_finite(a):
                raise WeightsError(f"{key_file[key]}: tensor '{key}' holds NaN or Inf values (a corrupt or badly "
                                   "converted checkpoint)")
            return a

        total = sum(int(np.prod(s)) for s, _ in expected.values()) * dtype.itemsize
        params = {"layers": [{} for _ in range(config.num_hidden_layers)]}
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", delay=2.0, leave=False) as bar:
            for path, (keys, shape) in weight_table(config).items():
                modules = [k[: -len(".weight")] for k in keys]
                if parallel is not None:
                    value = parallel.make_param(path[-1], config,
                                                lambda part, index, keys=keys: read_float(keys[part], index))
                elif quant is not None and _is_linear(keys[0]) and any(quant.converts(m) for m in modules):
                    value = _read_quantized(read, modules, quant, dtype, device)
                else:
                    arrays = [read_float(k) for k in keys]
                    value = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
                    value = jax.device_put(value, device)
                    if quantize is not None and _is_linear(keys[0]) and all(
                            qz.should_convert(m, modules_to_not_convert) for m in modules):
                        value = qz.quantize(value, quantize)
                _set(params, path, value)
                bar.update(int(np.prod(shape)) * dtype.itemsize)
        if (quantize is not None and config.tie_word_embeddings
                and qz.should_convert("lm_head", modules_to_not_convert)):
            table = params["embed_tokens"]
            params["embed_tokens"] = qz.TiedEmbedding(table, qz.quantize(table, quantize))
    finally:
        handles.clear()
    return params


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in a float array: its exponent bits are never all ones (integer ops, fast for bf16 too)."""
    exponent = {2: 0x7F80 if a.dtype.name == "bfloat16" else 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}
    mask = exponent[a.dtype.itemsize]
    bits = a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])
    return not np.any((bits & np.array(mask, bits.dtype)) == mask)


def _read_quantized(read, modules, quant: CheckpointQuantization, dtype, device):
    """One (possibly fused) linear weight of an FP8 or AWQ checkpoint; dequantized to `dtype` when only some of
    its parts are quantized (modules_to_not_convert naming q_proj but not k_proj, say)."""
    parts = []
    for m in modules:
        if not quant.converts(m):
            parts.append(jax.device_put(read(m + ".weight").astype(dtype), device))
        elif quant.method == "fp8":
            parts.append(jax.device_put(qz.from_fp8(read(m + ".weight"), read(m + ".weight_scale_inv"),
                                                    quant.block), device))
        else:
            parts.append(jax.device_put(qz.from_awq(read(m + ".qweight"), read(m + ".qzeros"), read(m + ".scales"),
                                                    quant.group_size), device))
    if all(isinstance(p, qz.QuantizedWeight) for p in parts):
        return parts[0] if len(parts) == 1 else qz.concat(parts)
    parts = [p.dequantize(dtype) if isinstance(p, qz.QuantizedWeight) else p for p in parts]
    return jnp.concatenate(parts, axis=0)


def _read(handle, key: str, path: Path) -> np.ndarray:
    try:
        if handle.get_slice(key).get_dtype() == "F8_E4M3":
            return _read_raw(path, key, np.dtype(jnp.float8_e4m3fn))
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read tensor '{key}' ({e})") from None


def _read_slice(handle, key: str, path: Path, index: tuple) -> np.ndarray:
    """Part of a float tensor (`index`: a slice per leading dim), read without reading the rest."""
    try:
        return handle.get_slice(key)[index]
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read tensor '{key}' ({e})") from None


def _read_raw(path: Path, key: str, dtype: np.dtype) -> np.ndarray:
    """A tensor read by its header entry (safetensors' numpy reader has no fp8: numpy itself has no fp8 type)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))[key]
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        data = f.read(end - start)
    shape = tuple(info["shape"])
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes for shape {shape} of {dtype}")
    return np.frombuffer(data, np.uint8).view(dtype).reshape(shape)


def _set(tree: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def random_params(config: Qwen3Config, seed: int = 0, *, dtype=None, quantize: str | None = None,
                  modules_to_not_convert: tuple[str, ...] = ()) -> dict:
    """Random params at the config's shapes (normal * 0.02, norms near 1), made on the device: for benchmarks.
    `quantize` and `modules_to_not_convert` as in `load_params`."""
    dtype = dtype or config.jnp_dtype
    key = jax.random.key(seed)
    params = {"layers": [{} for _ in range(config.num_hidden_layers)]}
    for n, (path, (keys, shape)) in enumerate(weight_table(config).items()):
        k = jax.random.fold_in(key, n)
        if len(shape) == 1:  # norm weights
            value = 1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)
        else:
            value = 0.02 * jax.random.normal(k, shape, jnp.float32)
        value = value.astype(dtype)
        if quantize is not None and _is_linear(keys[0]) and all(
                qz.should_convert(m[: -len(".weight")], modules_to_not_convert) for m in keys):
            value = qz.quantize(value, quantize)
        _set(params, path, value)
    if quantize is not None and config.tie_word_embeddings and qz.should_convert("lm_head", modules_to_not_convert):
        params["embed_tokens"] = qz.TiedEmbedding(params["embed_tokens"], qz.quantize(params["embed_tokens"], quantize))
    return params
