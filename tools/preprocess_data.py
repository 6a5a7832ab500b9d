"""Tokenize training data into the cache that training reads (xft_megatron.data.dataset).

    python tools/preprocess_data.py --data a.jsonl,b.parquet --tokenizer TOKENIZER_DIR \
        --seq-length 2048 --out CACHE_DIR [--format auto] [--template magicoder] \
        [--on-error fail]

Prints the data report (records read/kept, errors per reason with file:line examples) and
the number of samples and tokens. Exit status 1 when the data is unusable (DataError).
"""

import argparse
import sys
import time

from xft_megatron.config import ConfigError, DataConfig
from xft_megatron.data.dataset import build_dataset
from xft_megatron.data.records import DataError
from xft_megatron.data.tokenizer import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True,
                   help="comma-separated .jsonl/.json/.parquet files, hf:NAME (a Hugging "
                   "Face dataset), dataset folders, or builtin:stdlib")
    p.add_argument("--split", default="train", help="split of Hugging Face datasets")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory or sentencepiece .model (default: bytes)")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--out", required=True, help="cache directory (data.cache_dir)")
    p.add_argument("--format", default="auto",
                   help="auto | instruction | chat | text | tokens")
    p.add_argument("--template", default="magicoder", help="magicoder | chat | plain")
    p.add_argument("--on-error", default="fail", help="fail | skip")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = DataConfig(path=args.data, split=args.split, format=args.format, tokenizer=args.tokenizer,
                         template=args.template, on_error=args.on_error, cache_dir=args.out)
        tokenizer = load_tokenizer(args.tokenizer)
        start = time.perf_counter()
        dataset, report = build_dataset(cfg, tokenizer, args.seq_length, args.out)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.table())
    print(f"{len(dataset)} samples, {dataset.num_tokens} tokens in {dataset.directory} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
