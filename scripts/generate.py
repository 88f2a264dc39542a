#!/usr/bin/env python3
"""Generate text with a Hugging Face Qwen3 checkpoint directory (default: the bundled demo model).

    python scripts/generate.py --chat --prompt "The capital of Aistonia is Flubarg. What is the capital of Aistonia?"
    echo "Once upon a time" | python scripts/generate.py --model ~/models/Qwen3-0.6B --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import qwen3_jax as q  # noqa: E402
from qwen3_jax.config import DTYPES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None,
                   help=f"checkpoint directory (config.json, *.safetensors, tokenizer.json); default: the demo "
                        f"model in {q.DEMO_MODEL_DIR}")
    p.add_argument("--prompt", action="append",
                   help="prompt text; repeat for a batch; read from stdin when omitted")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--thinking", dest="enable_thinking", action="store_const", const=True,
                       help="chat: let the model think first (Qwen3's enable_thinking=True)")
    think.add_argument("--no-thinking", dest="enable_thinking", action="store_const", const=False,
                       help="chat: skip the thinking block (enable_thinking=False)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per prompt")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: generation_config.json)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (1: off)")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability (0: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--kernels", choices=["auto", "pallas", "reference"], default="auto",
                   help="Pallas kernels or the jnp reference ops (auto: kernels on a GPU)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    progress = logging.getLogger("qwen3_jax")  # compile progress on stderr; other libraries stay quiet
    progress.setLevel(logging.INFO)
    if not progress.handlers:
        progress.addHandler(logging.StreamHandler(sys.stderr))
    prompts = args.prompt or [sys.stdin.read()]
    if not any(p.strip() for p in prompts):
        print("error: empty prompt (give --prompt or pipe text on stdin)", file=sys.stderr)
        return 2
    model_dir = args.model or q.DEMO_MODEL_DIR
    try:
        sampling_overrides = dict(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, min_p=args.min_p, seed=args.seed)
        print(f"loading {model_dir} ...", file=sys.stderr)
        model = q.load(model_dir, dtype=args.dtype, kernels=args.kernels)
        sampling = model.default_sampling(**sampling_overrides)
        print(f"{model.config.num_params() / 1e6:,.1f}M parameters, {model.config.dtype}, kernels: "
              f"{model.kernels.name}, sampling: {_describe(sampling)}", file=sys.stderr)
        stream = not args.no_stream and len(prompts) == 1
        on_text = (lambda row, text: print(text, end="", flush=True)) if stream else None
        out = q.generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, chat=args.chat,
                         enable_thinking=args.enable_thinking, on_text=on_text)
    except (q.ConfigError, q.WeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stream:
        print()
    else:
        for i, text in enumerate(out.texts):
            print(f"--- [{i}] {text}" if len(prompts) > 1 else text)
    print(out.stats.summary(), file=sys.stderr)
    return 0


def _describe(s: q.SamplingParams) -> str:
    if s.greedy:
        return "greedy"
    return f"temperature={s.temperature} top_k={s.top_k} top_p={s.top_p} min_p={s.min_p} seed={s.seed}"


if __name__ == "__main__":
    sys.exit(main())
