"""Qwen3Config: the model's shape and numerics, read from a Hugging Face config.json and validated in one place."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
# The optional keys transformers' `_compute_yarn_parameters` reads (beside rope_type, rope_theta, factor and
# original_max_position_embeddings); any other key in a yarn config is refused rather than ignored.
_YARN_OPTIONAL = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")
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
    # YaRN (rope_type "yarn"), with HF's `rope_parameters` names; None means unset, defaulting as HF does.
    rope_original_max_position_embeddings: int | None = None  # None: max_position_embeddings
    rope_attention_factor: float | None = None  # None: from factor (and mscale / mscale_all_dim when both set)
    rope_beta_fast: float | None = None  # None (or 0): 32
    rope_beta_slow: float | None = None  # None (or 0): 1
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_truncate: bool = True
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
        if self.rope_type == "yarn":
            self._check_yarn()
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    def _check_yarn(self):
        def number(name, value, positive=True):
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (positive and value <= 0):
                raise ConfigError(f"yarn rope scaling field '{name}' must be a {'positive ' if positive else ''}"
                                  f"number, got {value!r}")

        number("factor", self.rope_factor)
        if self.rope_factor < 1:
            raise ConfigError(f"yarn rope scaling field 'factor' must be >= 1, got {self.rope_factor!r}")
        orig = self.rope_original_max_position_embeddings
        if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0):
            raise ConfigError(f"yarn rope scaling field 'original_max_position_embeddings' must be a positive "
                              f"integer, got {orig!r}")
        number("attention_factor", self.rope_attention_factor)
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            number(name, getattr(self, f"rope_{name}"), positive=False)
        if not isinstance(self.rope_truncate, bool):
            raise ConfigError(f"yarn rope scaling field 'truncate' must be true or false, got {self.rope_truncate!r}")

    # ---- RoPE -----------------------------------------------------------------------------------------
    @property
    def rope_attention_scaling(self) -> float:
        """What HF multiplies RoPE's cos and sin by (`attention_scaling`): YaRN's attention factor, else 1."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)

        def get_mscale(scale, mscale=1.0):  # transformers' `_compute_yarn_parameters`, as written there
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if self.rope_mscale and self.rope_mscale_all_dim:
            return float(get_mscale(self.rope_factor, self.rope_mscale)
                         / get_mscale(self.rope_factor, self.rope_mscale_all_dim))
        return float(get_mscale(self.rope_factor))

    @property
    def max_context_len(self) -> int:
        """The longest sequence (prompt + output) the config allows: max_position_embeddings, or for YaRN the
        extended context factor * original_max_position_embeddings when that is longer (vLLM's rule; Qwen's
        YaRN recipe keeps max_position_embeddings at 40960 and reaches 4 * 32768 = 131072)."""
        if self.rope_type != "yarn":
            return self.max_position_embeddings
        orig = self.rope_original_max_position_embeddings or self.max_position_embeddings
        return max(self.max_position_embeddings, int(self.rope_factor * orig))

    def rope_parameters(self) -> dict:
        """This config's RoPE as transformers 5 writes it in config.json (`rope_parameters`)."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "yarn":
            rope["original_max_position_embeddings"] = (self.rope_original_max_position_embeddings
                                                        or self.max_position_embeddings)
            for name in _YARN_OPTIONAL:
                value = getattr(self, f"rope_{name}")
                if value is not None and not (name == "truncate" and value):
                    rope[name] = value
        return rope

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
        """RoPE inverse frequencies [head_dim/2] in float32, as HF computes them ('linear': scaled; 'yarn': the
        blend of interpolated and original frequencies of `_compute_yarn_parameters`, op by op in float32)."""
        d = self.head_dim
        f32 = np.float32
        pos_freqs = f32(self.rope_theta) ** (np.arange(0, d, 2, dtype=f32) / f32(d))  # [D/2]
        inv = f32(1.0) / pos_freqs
        if self.rope_type == "linear":
            inv = inv / f32(self.rope_factor)
        elif self.rope_type == "yarn":
            inv = self._yarn_inv_freq(pos_freqs, inv)
        return inv.astype(f32)

    def _yarn_inv_freq(self, pos_freqs: np.ndarray, extrapolation: np.ndarray) -> np.ndarray:
        """Frequencies that turn fewer than beta_slow times over the original context are interpolated
        (divided by factor), those turning more than beta_fast times kept, with a linear ramp between."""
        f32, d, base = np.float32, self.head_dim, self.rope_theta
        orig = self.rope_original_max_position_embeddings or self.max_position_embeddings
        beta_fast, beta_slow = self.rope_beta_fast or 32, self.rope_beta_slow or 1

        def correction_dim(num_rotations):  # in float64, as transformers computes it with `math`
            return (d * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if self.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(d // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
        extrapolation_factor = f32(1) - ramp
        interpolation = f32(1.0) / (f32(self.rope_factor) * pos_freqs)
        return interpolation * (f32(1) - extrapolation_factor) + extrapolation * extrapolation_factor

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
        if not raw.get("head_dim"):
            if not (_is_int(raw["hidden_size"]) and _is_int(heads) and heads > 0 and raw["hidden_size"] % heads == 0):
                raise ConfigError(f"{source}: hidden_size ({raw['hidden_size']!r}) is not a multiple of "
                                  f"num_attention_heads ({heads!r}) and there is no head_dim; set head_dim")
        head_dim = raw.get("head_dim") or (raw["hidden_size"] // heads)

        rope = _read_rope(raw, source)

        if dtype is None:
            dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise ConfigError(f"{source}: unsupported dtype '{dtype}'; choose one of {sorted(DTYPES)}")

        eos = raw.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        if not all(_is_int(t) and t >= 0 for t in eos):
            raise ConfigError(f"{source}: eos_token_id must be a token id or a list of token ids, got "
                              f"{raw.get('eos_token_id')!r}")
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
                **rope,
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


def _read_rope(raw: dict, source: str) -> dict:
    """RoPE settings (Qwen3Config fields) from transformers 5's `rope_parameters` or 4.x's `rope_theta` +
    `rope_scaling`, with transformers 5's defaults (`standardize_rope_params`, `_compute_yarn_parameters`)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be objects")
    if params and scaling and params != scaling:
        # transformers 5 takes rope_scaling alone (rope_theta then from the top level, else 10000) and 4.x
        # ignores rope_parameters: refuse rather than pick one of two readings.
        raise ConfigError(f"{source}: both rope_parameters and rope_scaling are set, and differ; put the RoPE "
                          "fields in one of them (rope_parameters with rope_theta inside for transformers 5, or "
                          "rope_scaling with a top-level rope_theta for 4.x)")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope scaling type '{rope_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    fields = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type != "default" and merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: rope partial_rotary_factor {merged['partial_rotary_factor']!r} is not "
                          "supported (Qwen3 rotates the whole head)")
    if rope_type == "linear":
        fields["rope_factor"] = float(merged.get("factor", 1.0))
    elif rope_type == "yarn":
        fields.update(_read_yarn(raw, merged, source))
    return fields


def _read_yarn(raw: dict, rope: dict, source: str) -> dict:
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
             *_YARN_OPTIONAL}
    unknown = sorted(set(rope) - known)
    if unknown:
        raise ConfigError(f"{source}: yarn rope scaling field(s) {', '.join(unknown)} not understood "
                          f"(known: factor, original_max_position_embeddings, {', '.join(_YARN_OPTIONAL)})")
    if "factor" not in rope:
        raise ConfigError(f"{source}: yarn rope scaling needs 'factor' (e.g. 4.0 for 4x the original context)")
    # transformers 5 gives a top-level original_max_position_embeddings priority (Phi-3's layout), and
    # defaults it to max_position_embeddings.
    orig = raw.get("original_max_position_embeddings", rope.get("original_max_position_embeddings"))
    if isinstance(orig, float) and orig.is_integer():
        orig = int(orig)
    if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0):
        raise ConfigError(f"{source}: yarn rope scaling field 'original_max_position_embeddings' must be a "
                          f"positive integer, got {orig!r}")
    factor = rope["factor"]
    if factor is None:  # transformers: an explicit null factor is the ratio of the two lengths
        max_pos = raw.get("max_position_embeddings", 40960)
        factor = max_pos / (orig or max_pos)
    if isinstance(factor, int) and not isinstance(factor, bool):
        factor = float(factor)
    fields = {"rope_factor": factor, "rope_original_max_position_embeddings": orig}
    for name in _YARN_OPTIONAL:
        if rope.get(name) is not None:
            fields[f"rope_{name}"] = rope[name]
    if "truncate" in rope and rope["truncate"] in (None, 0, 1):  # transformers tests its truthiness
        fields["rope_truncate"] = bool(rope["truncate"])
    return fields


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
