#!/usr/bin/env python3
"""Generate text with a Hugging Face Qwen3 checkpoint directory (default: the bundled demo model): the same as
`qwen3-jax generate`, runnable from a checkout without installing.

    python scripts/generate.py --chat --prompt "The capital of Aistonia is Flubarg. What is the capital of Aistonia?"
    echo "Once upon a time" | python scripts/generate.py --model ~/models/Qwen3-0.6B --max-new-tokens 64
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwen3_jax import cli  # noqa: E402


def main(argv=None) -> int:
    return cli.main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
