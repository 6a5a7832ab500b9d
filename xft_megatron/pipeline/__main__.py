"""`python -m xft_megatron.pipeline recipe ...`: the recipe's steps for run.sh (recipe.py)."""

import argparse
import sys

from xft_megatron.pipeline import recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xft_megatron.pipeline")
    sub = p.add_subparsers(dest="pipeline", required=True)
    recipe.add_arguments(sub.add_parser("recipe", help="the deepseek-coder XFT recipe"))
    return recipe.main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
