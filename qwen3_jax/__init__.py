"""qwen3-jax: Hugging Face Qwen3 checkpoints in JAX, with Pallas GPU kernels and a continuous-batching engine.

    import qwen3_jax as q
    llm = q.LLM("path/to/Qwen3-0.6B")
    print(llm.generate("Hello", q.SamplingParams(temperature=0, max_tokens=32))[0].text)
"""

from pathlib import Path

from .config import ConfigError, Qwen3Config
from .engine import EngineOptions, LLMEngine
from .generate import GenerationOutput, Qwen3, generate, load
from .kv_cache import AttentionMetadata, CacheOverflowError, KVCache
from .llm import LLM
from .model import forward
from .ops import Kernels
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import WeightsError

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"  # the small trained Qwen3 that ships with the package

__all__ = [
    "DEMO_MODEL_DIR",
    "AttentionMetadata", "CacheOverflowError", "CompletionOutput", "ConfigError", "EngineOptions",
    "GenerationOutput", "Kernels", "KVCache", "LLM", "LLMEngine", "Qwen3", "Qwen3Config", "RequestOutput",
    "SamplingParams", "Tokenizer", "WeightsError", "forward", "generate", "load",
]
