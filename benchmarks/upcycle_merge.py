"""Upcycle and fold at a real shape on the CPU: wall time, peak RSS, and the I/O floor.

    python -m benchmarks.upcycle_merge --preset deepseek-coder-1.3b --dir /tmp/xft_bench

1. writes a random-weight dense checkpoint of the preset (bf16),
2. `xft upcycle` to 8 experts / top-6, 3. `xft merge` (uniform coefficients) back to dense,
(both through the CLI entry point)
each stage in its own process (peak RSS = that process's max resident set). The I/O floor
for a stage is reading its input checkpoint's bytes plus writing its output's bytes with
plain file I/O (fsync'd), measured on the same disk right after.
"""

import os

from benchmarks import stages


def _run_stage(args):
    if args.stage == "dense":
        from xft_megatron.checkpoint import dist as ckpt
        from xft_megatron.config import load_config
        from xft_megatron.model.builder import build_model
        from xft_megatron.runtime import parallel

        cfg = load_config(None, [f"model.preset={args.preset}", "precision.dtype=bf16"])
        parallel.initialize(cfg.parallel)
        ckpt.save(build_model(cfg), os.path.join(args.dir, "dense"), 0, cfg)
    elif args.stage == "upcycle":
        from xft_megatron import cli

        stages.check(cli.main(["upcycle", "--ckpt", os.path.join(args.dir, "dense"), "--out",
                               os.path.join(args.dir, "moe"), "--num-experts", "8",
                               "--topk", "6"]))
    elif args.stage == "merge":
        from xft_megatron import cli

        stages.check(cli.main(["merge", "--ckpt", os.path.join(args.dir, "moe"), "--out",
                               os.path.join(args.dir, "merged")]))


if __name__ == "__main__":
    stages.main("benchmarks.upcycle_merge", "/tmp/xft_upcycle_bench", "dense",
                (("upcycle", "dense", "moe"), ("merge", "moe", "merged")), _run_stage)
