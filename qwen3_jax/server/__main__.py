"""`python -m qwen3_jax.server MODEL_DIR [flags]`: the OpenAI-compatible server (see `--help`)."""

import argparse
import sys

from . import add_serve_arguments, serve


def main(argv=None) -> int:
    """Parse the serve flags and run the server."""
    parser = argparse.ArgumentParser(prog="python -m qwen3_jax.server",
                                     description="Serve a Qwen3 checkpoint over an OpenAI-compatible HTTP API.")
    return serve(add_serve_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
