"""What the checkpoint checksums (checkpoint/checksums.py) add to save and load time.

    python -m benchmarks.checksum_overhead --dir /tmp/xft_crc_bench [--layers 24] [--json F]

At the upcycled deepseek-coder-1.3b MoE shape (8 experts, top-6, bf16: 7.0B parameters,
13.09 GiB; `--layers` fewer decoder layers to fit a smaller disk), in one process:
  save: `checkpoint.dist.save` through the streaming writer (as `xft upcycle` writes), with
        the checksums (each file hashed after it is written, manifest before the rename) and
        without them (hashing switched off), alternating;
  load: `stream.Reader` over every parameter, each tensor's bytes copied out (as a
        conversion consumes them), then `Reader.verified()`, with the verification (on
        background threads while the tensors are read) and without, page cache dropped
        before each when permitted (root) so both read from disk, else warm.
Also the hash alone over the written files (GB/s).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

from benchmarks.stages import dir_bytes, drop_page_cache


def _config(layers):
    from xft_megatron.config import load_config

    over = ["model.preset=deepseek-coder-1.3b", "precision.dtype=bf16", "moe.num_experts=8",
            "moe.topk=6"]
    if layers:
        over.append(f"model.num_layers={layers}")
    return load_config(None, over)


def _save(cfg, layout, root, on: bool) -> float:
    from xft_megatron.checkpoint import checksums, stream
    from xft_megatron.checkpoint import dist as ckpt

    hash_own, manifest = checksums.hash_own_files, checksums.write_manifest
    if not on:
        checksums.hash_own_files = lambda folder, sync=None: {}  # rank 0 flushes all
        checksums.write_manifest = lambda folder, files: None
    groups = layout.groups()
    block = torch.randn(1 << 24).to(torch.bfloat16)

    def group(g):  # values do not matter to the timing: a random block, tiled
        out = {}
        for n in groups[g]:
            p = layout.params[n]
            numel = torch.Size(p.shape).numel()
            out[n] = block.repeat(numel // block.numel() + 1)[:numel].view(p.shape)
        return out

    shutil.rmtree(root, ignore_errors=True)
    os.sync()
    try:
        t0 = time.perf_counter()
        ckpt.save_streamed(lambda f: stream.write(f, layout, stream.GroupCache(group)),
                           root, 0, cfg)
        return time.perf_counter() - t0
    finally:
        checksums.hash_own_files, checksums.write_manifest = hash_own, manifest


class _Nothing:
    folder = ""

    def result(self, collective=None):
        return None


def _load(layout, root, on: bool, cold: bool) -> float:
    from xft_megatron.checkpoint import checksums, stream

    start = checksums.start
    if not on:  # nothing to check: as for a checkpoint without a manifest, minus the notice
        checksums.start = lambda folder, names=None, collective=True: _Nothing()
    if cold:
        drop_page_cache()
    try:
        t0 = time.perf_counter()
        reader = stream.Reader(root, layout)
        for names in layout.groups().values():
            for value in reader.read(names).values():
                value.clone()
        reader.verified()  # as a tool does before committing its output
        return time.perf_counter() - t0
    finally:
        checksums.start = start


def _hash_only(root) -> float:
    from xft_megatron.checkpoint import checksums, dist as ckpt

    folder = ckpt.resolve(root)
    t0 = time.perf_counter()
    checksums.hash_files(folder, checksums.list_files(folder))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/xft_crc_bench")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: all 24)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
    from xft_megatron.checkpoint import stream

    cfg = _config(args.layers)
    stream.initialize_single_rank_layout()
    layout = stream.layout_of(cfg)
    root = os.path.join(args.dir, "ckpt")
    cold = drop_page_cache()
    saves = {True: [], False: []}
    loads = {True: [], False: []}
    for i in range(args.repeats):  # the last one with checksums: the loads need them
        for on in (False, True):
            saves[on].append(_save(cfg, layout, root, on))
            print(f"save checksums={on}: {saves[on][-1]:.2f} s", flush=True)
    size = dir_bytes(root)  # the last save (manifest or not, the same data files)
    hash_s = _hash_only(root)
    drop_page_cache()
    for i in range(args.repeats):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            loads[on].append(_load(layout, root, on, cold))
            print(f"load verify={on}: {loads[on][-1]:.2f} s", flush=True)
    best = lambda xs: min(xs)  # noqa: E731 - the least disturbed run of each
    result = {
        "shape": f"deepseek-coder-1.3b MoE 8 experts top-6 bf16, {cfg.model.num_layers} layers",
        "parameters": sum(torch.Size(p.shape).numel() for p in layout.params.values()),
        "bytes": size, "page_cache_dropped_before_loads": cold,
        "save_s": {"checksums": saves[True], "none": saves[False]},
        "load_s": {"verify": loads[True], "none": loads[False]},
        "save_overhead": best(saves[True]) / best(saves[False]) - 1,
        "load_overhead": best(loads[True]) / best(loads[False]) - 1,
        "hash_only_s": hash_s, "hash_gb_per_s": size / hash_s / 1e9,
        "save_gb_per_s": size / best(saves[False]) / 1e9,
        "load_gb_per_s": size / best(loads[False]) / 1e9,
        "threads": __import__("xft_megatron.checkpoint.checksums",
                              fromlist=["THREADS"]).THREADS,
        "python": sys.version.split()[0], "torch": torch.__version__,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
