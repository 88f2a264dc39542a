"""`python -m qwen3_jax ...`: the `qwen3-jax` command."""

import sys

from .cli import main

sys.exit(main())
