"""Qwen3Config: the model's shape and numerics, read from a Hugging Face config.json and validated in one place."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SUPPORTED_ROPE_TYPES = ("default", "linear")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


class ConfigError(ValueError):
    """A config.json that this engine cannot run, with the reason."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """A dense Qwen3 model's hyper-parameters, with Hugging Face's field names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype '{self.dtype}'; choose one of {sorted(DTYPES)}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope scaling type '{self.rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2] in float32, as HF computes them (scaled for 'linear')."""
        d = self.head_dim
        inv = 1.0 / (np.float32(self.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
        if self.rope_type == "linear":
            inv = inv / np.float32(self.rope_factor)
        return inv.astype(np.float32)

    def num_params(self) -> int:
        h, l = self.hidden_size, self.num_hidden_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * self.intermediate_size
        per_layer += 2 * h + 2 * self.head_dim
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return l * per_layer + embed + h

    def replace(self, **changes) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)

    # ---- reading config.json -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, *, dtype: str | None = None, source: str = "config") -> "Qwen3Config":
        """Validate a config.json dict (as written by transformers 4.x or 5.x) and build the config."""
        model_type = raw.get("model_type")
        if model_type != "qwen3":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; this engine runs dense Qwen3 models (model_type 'qwen3')"
            )
        missing = [k for k in _REQUIRED if raw.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s): {', '.join(missing)}")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (Qwen3 uses 'silu')")
        if raw.get("attention_bias", False):
            raise ConfigError(f"{source}: attention_bias=true is not supported (Qwen3 has no attention biases)")
        if raw.get("use_sliding_window", False):
            raise ConfigError(
                f"{source}: use_sliding_window=true is not supported; released dense Qwen3 checkpoints "
                "use full attention in every layer"
            )
        layer_types = raw.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{source}: layer_types other than 'full_attention' are not supported")

        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or (raw["hidden_size"] // heads)

        rope_theta, rope_type, rope_factor = _read_rope(raw, source)

        if dtype is None:
            dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise ConfigError(f"{source}: unsupported dtype '{dtype}'; choose one of {sorted(DTYPES)}")

        eos = raw.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        try:
            return cls(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_type=rope_type,
                rope_factor=rope_factor,
                max_position_embeddings=raw.get("max_position_embeddings", 40960),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                dtype=dtype,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=eos,
                pad_token_id=raw.get("pad_token_id"),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype: str | None = None) -> "Qwen3Config":
        """Read and validate `model_dir/config.json`."""
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the model directory")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, dtype=dtype, source=str(path))


def _read_rope(raw: dict, source: str) -> tuple[float, str, float]:
    """RoPE settings from either transformers 5's `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be objects")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope scaling type '{rope_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    factor = float(merged.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return float(theta), rope_type, factor
