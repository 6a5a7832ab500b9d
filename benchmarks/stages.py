"""Shared driver of the CPU stage benchmarks (`convert.py`, `upcycle_merge.py`): each stage
runs in its own process and records its own peak RSS; each timed stage is compared with the
I/O floor (reading its input's bytes plus writing its output's bytes with plain file I/O,
fsync'd, on the same disk right after). Where permitted (root), the page cache is dropped
before each stage and each floor, so both read from disk."""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def io_floor(src, out_bytes, scratch):
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


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only), so a stage and its I/O floor both
    read their input from disk; False where not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def check(code):
    """A stage's command must succeed."""
    if code:
        raise SystemExit(f"the command failed with exit code {code}")


def record_rss(directory, stage):
    """Called at the end of a stage's process: its own peak RSS (KiB) into a file."""
    with open(os.path.join(directory, f"{stage}.rss"), "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def run_stage(module, name, argv):
    """Run one stage of `module` in a child process; (seconds, peak RSS GiB)."""
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", module, "--stage", name] + argv)
    elapsed = time.perf_counter() - t0
    if code:
        raise SystemExit(f"stage {name} failed with exit code {code}")
    with open(os.path.join(argv[argv.index("--dir") + 1], f"{name}.rss")) as f:
        return elapsed, int(f.read()) / 2 ** 20


def main(module, default_dir, setup_stage, timed_stages, run_stage_fn):
    """CLI of a stage benchmark. `timed_stages`: (name, input folder, output folder);
    `run_stage_fn(args)` runs one stage (`--stage NAME`) inside its child process."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-coder-1.3b")
    ap.add_argument("--dir", default=default_dir)
    ap.add_argument("--stage", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--free-inputs", action="store_true",
                    help="delete a stage's input once no later stage reads it (large shapes "
                         "on a small disk)")
    args = ap.parse_args()
    if args.stage:
        run_stage_fn(args)
        record_rss(args.dir, args.stage)
        return
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    common = ["--preset", args.preset, "--dir", args.dir]
    run_stage(module, setup_stage, common)
    rows = {}
    cold = drop_page_cache()
    for i, (name, src, out) in enumerate(timed_stages):
        drop_page_cache()
        seconds, peak = run_stage(module, name, common)
        in_b = dir_bytes(os.path.join(args.dir, src))
        out_b = dir_bytes(os.path.join(args.dir, out))
        drop_page_cache()
        floor = io_floor(os.path.join(args.dir, src), out_b, args.dir)
        rows[name] = dict(seconds=seconds, peak_rss_gib=peak, input_gib=in_b / 2 ** 30,
                          output_gib=out_b / 2 ** 30, io_floor_s=floor,
                          ratio_to_floor=seconds / floor, rss_over_input=peak * 2 ** 30 / in_b)
        print(f"{name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB ({peak * 2 ** 30 / in_b:.0%} "
              f"of the input), in {in_b / 2 ** 30:.2f} GiB -> out {out_b / 2 ** 30:.2f} GiB, "
              f"I/O floor {floor:.1f} s, ratio {seconds / floor:.1f}x", flush=True)
        if args.free_inputs and all(later[1] != src for later in timed_stages[i + 1:]):
            shutil.rmtree(os.path.join(args.dir, src))
    env = dict(date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(), command=" ".join(sys.argv),
               page_cache="dropped before each stage and each floor" if cold else
               "not dropped (needs root): floors read a warm cache")
    print("env:", env)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
