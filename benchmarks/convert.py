"""HF <-> Megatron conversion at a real shape on the CPU: wall time, peak RSS, I/O floor.

    python -m benchmarks.convert --preset deepseek-coder-1.3b --dir /tmp/xft_convert_bench

1. writes a random-weight HF directory of the preset's shape (bf16 safetensors) with
   transformers, 2. `xft convert hf-to-mcore` (bf16), 3. `xft convert mcore-to-hf` (bf16),
each stage in its own process (peak RSS = that process's own maximum). The I/O floor of a
stage is reading its input's bytes plus writing its output's bytes with plain file I/O.
"""

import argparse
import json
import os
import shutil
import sys
import time

from benchmarks.upcycle_merge import _dir_bytes, _io_floor, _record_rss, _stage


def _run_stage(args):
    d = args.dir
    if args.stage == "hf":
        import torch
        import transformers

        from xft_megatron.config import load_config
        from xft_megatron.transforms.hf_llama import hf_config_dict

        m = load_config(None, [f"model.preset={args.preset}"]).model
        cfg = transformers.AutoConfig.for_model(**hf_config_dict(m, "LlamaForCausalLM"))
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(os.path.join(d, "hf"))
    elif args.stage == "hf-to-mcore":
        from xft_megatron.convert import hf_to_mcore

        hf_to_mcore(os.path.join(d, "hf"), os.path.join(d, "mcore"), dtype="bf16")
    elif args.stage == "mcore-to-hf":
        from xft_megatron.convert import mcore_to_hf

        mcore_to_hf(os.path.join(d, "mcore"), os.path.join(d, "hf_back"), dtype="bf16")
    _record_rss(d, args.stage)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-coder-1.3b")
    ap.add_argument("--dir", default="/tmp/xft_convert_bench")
    ap.add_argument("--stage", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.stage:
        return _run_stage(args)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    common = ["--preset", args.preset, "--dir", args.dir]
    _stage("benchmarks.convert", "hf", common)
    rows = {}
    for name, src, out in (("hf-to-mcore", "hf", "mcore"), ("mcore-to-hf", "mcore", "hf_back")):
        seconds, peak = _stage("benchmarks.convert", name, common)
        in_b = _dir_bytes(os.path.join(args.dir, src))
        out_b = _dir_bytes(os.path.join(args.dir, out))
        floor = _io_floor(os.path.join(args.dir, src), out_b, args.dir)
        rows[name] = dict(seconds=seconds, peak_rss_gib=peak, input_gib=in_b / 2 ** 30,
                          output_gib=out_b / 2 ** 30, io_floor_s=floor,
                          ratio_to_floor=seconds / floor, rss_over_model=peak * 2 ** 30 / in_b)
        print(f"{name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB ({peak * 2 ** 30 / in_b:.0%} "
              f"of the model), in {in_b / 2 ** 30:.2f} GiB -> out {out_b / 2 ** 30:.2f} GiB, "
              f"I/O floor {floor:.1f} s, ratio {seconds / floor:.1f}x", flush=True)
    env = dict(date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(), command=" ".join(sys.argv))
    print("env:", env)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
