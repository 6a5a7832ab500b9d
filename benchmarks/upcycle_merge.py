"""Upcycle and fold at a real shape on the CPU: wall time, peak RSS, and the I/O floor.

    python -m benchmarks.upcycle_merge --preset deepseek-coder-1.3b --dir /tmp/xft_bench

1. writes a random-weight dense checkpoint of the preset (bf16),
2. `xft upcycle` to 8 experts / top-6, 3. `xft merge` (uniform coefficients) back to dense,
each stage in its own process (peak RSS = that process's max resident set). The I/O floor
for a stage is reading its input checkpoint's bytes plus writing its output's bytes with
plain file I/O (fsync'd), measured on the same disk right after.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _io_floor(src, out_bytes, scratch):
    t0 = time.perf_counter()
    for r, _, fs in os.walk(src):
        for f in fs:
            with open(os.path.join(r, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
    path = os.path.join(scratch, "floor.bin")
    block = os.urandom(1 << 24)
    with open(path, "wb") as fh:
        left = out_bytes
        while left > 0:
            fh.write(block[:min(left, len(block))])
            left -= len(block)
        fh.flush()
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - t0
    os.remove(path)
    return elapsed


def _record_rss(directory, stage):
    """Called at the end of a stage's process: its own peak RSS (KiB) into a file."""
    with open(os.path.join(directory, f"{stage}.rss"), "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def _stage(module, name, argv):
    """Run one stage of `module` in a child process; (seconds, peak RSS GiB)."""
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", module, "--stage", name] + argv)
    elapsed = time.perf_counter() - t0
    if code:
        raise SystemExit(f"stage {name} failed with exit code {code}")
    with open(os.path.join(argv[argv.index("--dir") + 1], f"{name}.rss")) as f:
        return elapsed, int(f.read()) / 2 ** 20


def _run_stage(args):
    from xft_megatron.config import MoEConfig

    if args.stage == "dense":
        from xft_megatron import parallel
        from xft_megatron.checkpoint import dist as ckpt
        from xft_megatron.config import load_config
        from xft_megatron.model.builder import build_model

        cfg = load_config(None, [f"model.preset={args.preset}", "precision.dtype=bf16"])
        parallel.initialize(cfg.parallel)
        ckpt.save(build_model(cfg), os.path.join(args.dir, "dense"), 0, cfg)
    elif args.stage == "upcycle":
        from xft_megatron.upcycle_merge import upcycle_checkpoint

        upcycle_checkpoint(os.path.join(args.dir, "dense"), os.path.join(args.dir, "moe"),
                           MoEConfig(num_experts=8, topk=6))
    elif args.stage == "merge":
        from xft_megatron.upcycle_merge import merge_checkpoint

        merge_checkpoint(os.path.join(args.dir, "moe"), os.path.join(args.dir, "merged"),
                         report=lambda *a: None)
    _record_rss(args.dir, args.stage)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-coder-1.3b")
    ap.add_argument("--dir", default="/tmp/xft_upcycle_bench")
    ap.add_argument("--stage", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.stage:
        return _run_stage(args)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    common = ["--preset", args.preset, "--dir", args.dir]
    rows = {}
    _stage("benchmarks.upcycle_merge", "dense", common)
    for name, src, out in (("upcycle", "dense", "moe"), ("merge", "moe", "merged")):
        seconds, peak = _stage("benchmarks.upcycle_merge", name, common)
        in_b, out_b = _dir_bytes(os.path.join(args.dir, src)), \
            _dir_bytes(os.path.join(args.dir, out))
        floor = _io_floor(os.path.join(args.dir, src), out_b, args.dir)
        rows[name] = dict(seconds=seconds, peak_rss_gib=peak,
                          input_gib=in_b / 2 ** 30, output_gib=out_b / 2 ** 30,
                          io_floor_s=floor, ratio_to_floor=seconds / floor)
        print(f"{name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB, "
              f"in {in_b / 2 ** 30:.2f} GiB -> out {out_b / 2 ** 30:.2f} GiB, I/O floor "
              f"{floor:.1f} s, ratio {seconds / floor:.1f}x", flush=True)
    env = dict(date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(), command=" ".join(sys.argv))
    print("env:", env)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
