"""qwen3-jax: Hugging Face Qwen3 checkpoints in JAX, with Pallas GPU kernels and a continuous-batching engine.

    import qwen3_jax as q
    llm = q.LLM("path/to/Qwen3-0.6B")
    print(llm.generate("Hello", q.SamplingParams(temperature=0, max_tokens=32))[0].text)

The names below are imported on first use, so `qwen3-jax --help` answers without importing jax.
"""

import importlib
import sys
import types
from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"  # the small trained Qwen3 that ships with the package

_EXPORTS = {  # public name -> the submodule defining it
    "ConfigError": "config", "Qwen3Config": "config",
    "EngineOptions": "engine", "LLMEngine": "engine",
    "GenerationOutput": "generate", "Qwen3": "generate", "generate": "generate", "load": "generate",
    "enable_compilation_cache": "generate",
    "AttentionMetadata": "kv_cache", "CacheOverflowError": "kv_cache", "KVCache": "kv_cache",
    "LLM": "llm",
    "forward": "model",
    "Kernels": "ops",
    "TensorParallel": "parallel",
    "CompletionOutput": "outputs", "RequestOutput": "outputs",
    "SamplingParams": "sampling",
    "Tokenizer": "tokenizer",
    "WeightsError": "weights",
}

__all__ = ["DEMO_MODEL_DIR", *sorted(_EXPORTS)]


class _Package(types.ModuleType):
    def __getattr__(self, name):
        if name not in _EXPORTS:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", self.__name__), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name, value):
        # Importing the submodule `generate` sets the package attribute of that name; `q.generate` stays the function.
        if isinstance(value, types.ModuleType) and name in _EXPORTS and value.__name__ == f"{self.__name__}.{name}":
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package
