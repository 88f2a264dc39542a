"""qwen3-jax: Hugging Face Qwen3 checkpoints in JAX, with Pallas GPU kernels.

    import qwen3_jax as q
    model = q.load("path/to/Qwen3-0.6B")
    print(q.generate(model, "Hello", chat=True).texts[0])
"""

from pathlib import Path

from .config import ConfigError, Qwen3Config
from .generate import GenerationOutput, Qwen3, generate, generate_tokens, load
from .kv_cache import CacheOverflowError, KVCache
from .model import forward
from .ops import Kernels
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import WeightsError

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"  # the small trained Qwen3 that ships with the package

__all__ = [
    "DEMO_MODEL_DIR",
    "CacheOverflowError", "ConfigError", "GenerationOutput", "Kernels", "KVCache", "Qwen3", "Qwen3Config",
    "SamplingParams", "Tokenizer", "WeightsError", "forward", "generate", "generate_tokens", "load",
]
