"""`xft eval loss` against a plain transformers loop on the same records, side by side (CPU).

    python benchmarks/eval_loss.py [--hf DIR] [--records N] [--out FILE.json]

The model is SmolLM2-135M-Instruct (tests/real_model.py; any HF directory with --hf). Records:
instruction pairs mined from stdlib modules (magicoder template). The transformers loop loads
the model and scores one record per forward (exact length, causal, loss on the response
tokens); `xft eval loss` reads the converted checkpoint, tokenizes into a fresh cache, packs and
scores. Both are timed end to end in this process (model load included, imports excluded), the
losses compared, and the ratio printed.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mined_records(n: int):
    import sysconfig

    from xft_megatron.data.mine_code import mine_functions, module_name

    lib = sysconfig.get_paths()["stdlib"]
    out = []
    for name in ("calendar.py", "datetime.py", "pathlib.py", "mailbox.py", "tarfile.py"):
        path = os.path.join(lib, name)
        with open(path, encoding="utf-8") as f:
            out += [r for r in mine_functions(f.read(), module_name(lib, path))
                    if len(r["instruction"]) + len(r["response"]) < 4000]
    return out[:n]


def transformers_loss(hf_dir: str, records):
    from xft_megatron.data.templates import MAGICODER
    from xft_megatron.hf.files import load_hf_model, load_hf_tokenizer

    t0 = time.perf_counter()
    tok = load_hf_tokenizer(hf_dir)
    model = load_hf_model(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for r in records:
            prompt = [tok.bos_token_id] + tok.encode(
                MAGICODER.format(instruction=r["instruction"]), add_special_tokens=False)
            ids = prompt + tok.encode(r["response"], add_special_tokens=False) + \
                [tok.eos_token_id]
            x = torch.tensor([ids])
            logits = model(x).logits[0, len(prompt) - 1:-1].float()
            total += torch.nn.functional.cross_entropy(
                logits, x[0, len(prompt):], reduction="sum").item()
            count += len(ids) - len(prompt)
    return total / count, count, time.perf_counter() - t0


def xft_loss(ckpt: str, data: str, seq_length: int, micro_batch_size: int):
    from xft_megatron.eval.loss import evaluate_loss

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        r = evaluate_loss(ckpt, data, cache_dir=cache, seq_length=seq_length,
                          micro_batch_size=micro_batch_size)
        return r["loss"], r["tokens"], time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", default=None)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=None,
                    help="xft eval loss --seq-length (default: the checkpoint's)")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from xft_megatron.hf import convert

    if args.hf is None:
        from tests.real_model import smollm2_hf_dir

        args.hf = smollm2_hf_dir()
    records = mined_records(args.records)
    with tempfile.TemporaryDirectory() as root:
        data = os.path.join(root, "records.jsonl")
        with open(data, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        ckpt = convert.hf_to_mcore(args.hf, os.path.join(root, "mc"))
        xft = xft_loss(ckpt, data, args.seq_length, args.micro_batch_size)
        ref = transformers_loss(args.hf, records)
    result = {"records": len(records), "threads": torch.get_num_threads(),
              "transformers": {"loss": ref[0], "tokens": ref[1], "seconds": round(ref[2], 2)},
              "xft": {"loss": xft[0], "tokens": xft[1], "seconds": round(xft[2], 2)},
              "ratio_xft_over_transformers": round(xft[2] / ref[2], 3),
              "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
