"""HF <-> Megatron conversion at a real shape on the CPU: wall time, peak RSS, I/O floor.

    python -m benchmarks.convert --preset deepseek-coder-1.3b --dir /tmp/xft_convert_bench

1. writes a random-weight HF directory of the preset's shape (bf16 safetensors) with
   transformers, 2. `xft convert hf-to-mcore` (bf16), 3. `xft convert mcore-to-hf` (bf16),
   both through the CLI entry point,
each stage in its own process (peak RSS = that process's own maximum). The I/O floor of a
stage is reading its input's bytes plus writing its output's bytes with plain file I/O.
"""

import os

from benchmarks import stages


def _run_stage(args):
    d = args.dir
    if args.stage == "hf":
        import torch
        import transformers

        from xft_megatron.arch import families
        from xft_megatron.config import load_config

        m = load_config(None, [f"model.preset={args.preset}"]).model
        cfg = transformers.AutoConfig.for_model(**families.of(m).hf_config(m))
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(os.path.join(d, "hf"))
    elif args.stage == "hf-to-mcore":
        from xft_megatron import cli

        stages.check(cli.main(["convert", "hf-to-mcore", "--hf", os.path.join(d, "hf"),
                               "--out", os.path.join(d, "mcore"), "--dtype", "bf16"]))
    elif args.stage == "mcore-to-hf":
        from xft_megatron import cli

        stages.check(cli.main(["convert", "mcore-to-hf", "--ckpt", os.path.join(d, "mcore"),
                               "--out", os.path.join(d, "hf_back"), "--dtype", "bf16"]))


if __name__ == "__main__":
    stages.main("benchmarks.convert", "/tmp/xft_convert_bench", "hf",
                (("hf-to-mcore", "hf", "mcore"), ("mcore-to-hf", "mcore", "hf_back")),
                _run_stage)
