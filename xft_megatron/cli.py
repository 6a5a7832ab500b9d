"""`xft <command>`: a thin dispatcher; each command is a function in the library."""

import argparse
import logging
import os
import signal
import sys
import threading
import warnings

from xft_megatron.errors import ConfigError, Terminated, UserError


def _model_dir(ref, flag: str):
    """A local HF directory as given, else a Hub id `org/name[@revision]` through the Hugging
    Face cache (xft_megatron/runtime/hub.py; HF_HOME, HF_HUB_OFFLINE read here, at the entry
    point)."""
    if ref is None:
        return None
    from xft_megatron.runtime.hub import HubSettings, resolve_model_dir

    return resolve_model_dir(ref, HubSettings.from_env(), flag)


def _quickstart(args):
    from xft_megatron.pipeline import quickstart

    args.base = _model_dir(args.base, "--base")
    quickstart.run(args.out, quickstart.settings_from_args(args), overrides=args.overrides)


def _presets(args):
    from xft_megatron.arch.families import PRESETS
    from xft_megatron.config import model_config_from_dict

    for name in PRESETS:
        m = model_config_from_dict({"preset": name})
        print(f"{name:22s} {m.family:8s} layers={m.num_layers:3d} hidden={m.hidden_size:5d} "
              f"ffn={m.ffn_hidden_size:6d} heads={m.num_attention_heads:3d}/"
              f"{m.num_query_groups:<3d} vocab={m.vocab_size:6d} "
              f"params={m.num_parameters() / 1e9:.3f}B")


def _stored_config(path: str):
    """The config stored with checkpoint `path` (Megatron is imported only when one is read)."""
    from xft_megatron.checkpoint.dist import read_config

    return read_config(path)


def _config(args):
    """The config `xft train` would run with the same arguments (built the same way, refused
    for the same reasons); what a run needs beyond it is named on stderr."""
    from xft_megatron.config import ConfigError, dump_config, load_config, require_runnable

    cfg = load_config(args.config, args.overrides, read_stored=_stored_config)
    print(dump_config(cfg), end="")
    try:
        require_runnable(cfg)
    except ConfigError as e:
        print(f"# xft train needs more: {e}", file=sys.stderr)


def _verify(args, hf_dir: str, ckpt_dir: str) -> None:
    if args.verify:
        from xft_megatron.hf.verify import verify

        verify(hf_dir, ckpt_dir)


def _hf_to_mcore(args):
    from xft_megatron.hf.convert import hf_to_mcore
    from xft_megatron.runtime.allocator import release_freed_memory

    release_freed_memory()
    args.hf = _model_dir(args.hf, "--hf")
    path = hf_to_mcore(args.hf, args.out, dtype=args.dtype or "fp32")
    print(f"wrote {path}")
    _verify(args, args.hf, path)


def _mcore_to_hf(args):
    from xft_megatron.hf.convert import mcore_to_hf
    from xft_megatron.hf.files import own_remote_code
    from xft_megatron.runtime.allocator import release_freed_memory

    release_freed_memory()
    mcore_to_hf(args.ckpt, args.out, dtype=args.dtype)
    moe = own_remote_code(args.out)
    print(f"wrote {args.out}" + (" (an XFT MoE: load it with trust_remote_code=True; "
                                 "`xft merge` folds it into a dense model)" if moe else ""))
    _verify(args, args.out, args.ckpt)


def _gguf_to_hf(args):
    from xft_megatron.hf.gguf import gguf_to_hf
    from xft_megatron.runtime.allocator import release_freed_memory

    release_freed_memory()
    print(f"wrote {gguf_to_hf(args.gguf, args.out, dtype=args.dtype or 'fp32')}")


def _upcycle(args):
    from xft_megatron.config import MoEConfig
    from xft_megatron.runtime.allocator import reuse_freed_memory
    from xft_megatron.xft.checkpoints import upcycle_checkpoint

    reuse_freed_memory()
    hf_dir = _model_dir(args.hf, "--hf")
    moe = MoEConfig(num_experts=args.num_experts, topk=args.topk, mode=args.mode,
                    router_gate=args.router_gate, layer_freq=args.layer_freq,
                    router_noise=not args.no_router_noise,
                    router_init_std=args.router_init_std)
    path = upcycle_checkpoint(args.ckpt, args.out, moe, seed=args.seed, noise_std=args.noise,
                              hf_dir=hf_dir, layout=_layout(args), drop_ratio=args.drop_ratio)
    print(f"wrote {path}")


def _merge(args):
    from xft_megatron.runtime.allocator import reuse_freed_memory
    from xft_megatron.xft.checkpoints import merge_checkpoint

    reuse_freed_memory()
    path = merge_checkpoint(args.ckpt, args.out, args.coefficients, args.shared_weight,
                            _layout(args), hf_out=args.hf_out)
    print(f"wrote {path}")


def _train(args):
    from xft_megatron.training.signals import StopOnSignal

    stop = None if args.dry_run else (args.stop or StopOnSignal())
    from xft_megatron.training import run

    result = run.main(args.config, args.overrides, resume=args.resume, dry=args.dry_run,
                      world_size=args.world_size, stop=stop)
    if result is not None and result.checkpoint:
        from xft_megatron.runtime.parallel import say

        say(f"wrote {result.checkpoint}")


def _eval_loss(args):
    import json

    from xft_megatron.eval.loss import evaluate_loss
    from xft_megatron.runtime.parallel import say

    cache = args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "xft-megatron",
                                           "eval")
    result = evaluate_loss(args.ckpt, args.data, tokenizer=args.tokenizer, layout=_layout(args),
                           seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                           template=args.template, fmt=args.format, cache_dir=cache,
                           on_error=args.on_error, split=args.split)
    say(json.dumps(result))


def _data(args):
    from xft_megatron.data import mine_code

    code = mine_code.run(args)
    if code:
        raise SystemExit(code)


def _humaneval(args):
    import json

    from xft_megatron.eval.humaneval import run_humaneval
    from xft_megatron.runtime.hub import HubSettings
    from xft_megatron.runtime.parallel import say

    result, path = run_humaneval(args.model, args.out, n=args.n, limit=args.limit,
                                 temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens, workers=args.workers,
                                 prompt=args.prompt, problems_file=args.problems,
                                 hub=HubSettings.from_env(), report=say)
    say(json.dumps({k: result[k] for k in ("pass@1", "pass@k", "n", "limit", "protocol")
                    if k in result}))
    say(f"per-task results: {path}")


def _moe_layers(text: str) -> int:
    """--layers all | every-N | N -> the MoE layer frequency."""
    value = text.strip().lower()
    if value == "all":
        return 1
    number = value[len("every-"):] if value.startswith("every-") else value
    if not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not all, every-N or N (N >= 1)")
    return int(number)


def _layout(args) -> dict:
    """The parallel section of --tp/--pp/--ep(/--etp)."""
    out = {"tensor": args.tp, "pipeline": args.pp, "expert": args.ep,
           "sequence_parallel": args.tp > 1}
    if getattr(args, "etp", None) is not None:
        out["expert_tensor"] = args.etp
    return out


_STORED = ("stored as the checkpoint's default layout (any layout loads it; under torchrun the "
           "work is spread over all ranks)")


def _add_layout_flags(parser, what: str, etp: bool = False) -> None:
    for flag, name in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert")):
        parser.add_argument(flag, type=int, default=1, help=f"{name} parallel size {what}")
    if etp:
        parser.add_argument("--etp", type=int, default=None,
                            help=f"expert tensor parallel size (default: --tp) {what}")


def build_parser() -> argparse.ArgumentParser:
    from xft_megatron.pipeline import quickstart  # its Settings, as flags (imports no torch)

    p = argparse.ArgumentParser(prog="xft", description="XFT on Megatron-Core")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="run the built-in end-to-end example on this machine")
    q.add_argument("--out", default="runs/quickstart", help="output directory")
    quickstart.add_arguments(q)  # one flag per quickstart.Settings field
    q.add_argument("overrides", nargs="*", help="config overrides, e.g. precision.dtype=bf16")
    q.set_defaults(func=_quickstart)

    s = sub.add_parser("presets", help="list the model presets")
    s.set_defaults(func=_presets)

    v = sub.add_parser("convert", help="HF directory <-> Megatron distributed checkpoint; "
                       "GGUF file -> HF directory")
    vsub = v.add_subparsers(dest="direction", required=True)
    h2m = vsub.add_parser("hf-to-mcore", help="HF directory -> Megatron checkpoint")
    h2m.add_argument("--hf", required=True,
                     help="HF model directory or Hub id org/name[@revision]")
    h2m.set_defaults(func=_hf_to_mcore)
    m2h = vsub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF directory")
    m2h.add_argument("--ckpt", required=True, help="Megatron checkpoint root or iter_* folder; "
                     "an XFT MoE is written with its modeling file (trust_remote_code)")
    m2h.set_defaults(func=_mcore_to_hf)
    g2h = vsub.add_parser("gguf-to-hf", help="GGUF file -> HF directory")
    g2h.add_argument("--gguf", required=True,
                     help="GGUF file (dequantized by transformers, needs the gguf package)")
    g2h.set_defaults(func=_gguf_to_hf)
    for d, default in ((h2m, "fp32"), (m2h, "the checkpoint's own precision.dtype, as every "
                                       "HF-writing command"), (g2h, "fp32")):
        d.add_argument("--out", required=True, help="output directory (must be new or empty)")
        d.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                       help=f"dtype written (default: {default})")
    for d in (h2m, m2h):
        d.add_argument("--verify", action="store_true",
                       help="compare both sides' logits on random tokens; exit 2 if they differ")

    u = sub.add_parser("upcycle", help="dense checkpoint -> XFT MoE checkpoint")
    src = u.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="dense Megatron checkpoint (any layout)")
    src.add_argument("--hf", help="dense HF model directory or Hub id org/name[@revision] "
                     "(converted on the way)")
    u.add_argument("--out", required=True, help="output directory (must be new or empty)")
    u.add_argument("--num-experts", type=int, default=8, help="experts per layer, shared incl.")
    u.add_argument("--topk", type=int, default=6, help="experts per token, shared included")
    u.add_argument("--mode", choices=["xft", "vanilla", "none"], default="xft",
                   help="xft: shared expert weighted 1 - s_max, routed weights renormalized; "
                   "the paper's ablations: vanilla (no shared expert, plain top-k), none "
                   "(shared expert at weight 1, raw top-k probabilities)")
    u.add_argument("--router-gate", choices=["mlp", "linear"], default="mlp")
    u.add_argument("--no-router-noise", action="store_true", help="no noisy-gating weights")
    u.add_argument("--router-init-std", type=float, default=0.02, metavar="S",
                   help="std of the router's (and noise gate's) initial weights (default 0.02, "
                   "the paper's: routing starts near uniform; larger makes it depend on the "
                   "token from step 1)")
    u.add_argument("--layers", "--layer-freq", dest="layer_freq", type=_moe_layers, default=1,
                   help="which layers become MoE: all (default) | every-N (layers 0, N, 2N, ..)")
    u.add_argument("--noise", type=float, default=0.0,
                   help="std of noise added to routed expert copies (ablation; default 0)")
    u.add_argument("--drop-ratio", type=float, default=0.0, metavar="R",
                   help="Drop-Upcycling: re-initialize a seeded random fraction R in [0, 1) of "
                   "each routed expert's FFN neurons from the dense weights' mean/std (the "
                   "shared expert stays an exact copy; default 0: exact copies)")
    u.add_argument("--seed", type=int, default=0,
                   help="router initialization seed (also of --noise and --drop-ratio)")
    _add_layout_flags(u, _STORED, etp=True)
    u.set_defaults(func=_upcycle)

    m = sub.add_parser("merge", help="XFT MoE checkpoint -> dense checkpoint (the fold)")
    m.add_argument("--ckpt", required=True, help="XFT MoE checkpoint (any layout)")
    m.add_argument("--out", required=True, help="output directory (must be new or empty)")
    m.add_argument("--coefficients", default="uniform",
                   help="uniform | shared-only | learned | FILE.json of per-layer alphas")
    m.add_argument("--shared-weight", type=float, default=0.75, help="lambda, in [0, 1]")
    m.add_argument("--hf-out", default=None, help="also write an HF directory")
    _add_layout_flags(m, _STORED)
    m.set_defaults(func=_merge)

    t = sub.add_parser("train", help="train a stage (pretrain, sft, moe, merge); torchrun")
    t.add_argument("config", nargs="?", help="YAML file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in checkpoint.save")
    t.add_argument("--dry-run", action="store_true",
                   help="validate, print layout, parameter counts and memory estimate, exit")
    t.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of ranks to plan for (default WORLD_SIZE)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = e.add_subparsers(dest="what", required=True)
    lo = esub.add_parser("loss", help="mean per-token loss and perplexity on a dataset")
    lo.add_argument("--ckpt", required=True, help="checkpoint (dense, MoE or merge stage)")
    lo.add_argument("--data", required=True, help="JSON/JSONL/Parquet file(s), hf:NAME (a "
                    "Hugging Face dataset) or dataset folders, comma-separated")
    lo.add_argument("--split", default="train", help="split of Hugging Face datasets")
    lo.add_argument("--tokenizer", default=None,
                    help="HF tokenizer dir or sentencepiece model (default: the checkpoint's)")
    lo.add_argument("--seq-length", type=int, default=None,
                    help="tokens per row (default: the checkpoint's train.seq_length)")
    lo.add_argument("--micro-batch-size", type=int, default=4)
    lo.add_argument("--template", default="magicoder", choices=["magicoder", "chat", "plain"])
    lo.add_argument("--format", default="auto",
                    choices=["auto", "instruction", "chat", "text", "tokens"])
    lo.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                    help="records that cannot be scored: fail, or skip and count them")
    lo.add_argument("--cache-dir", default=None,
                    help="tokenized-data cache (default ~/.cache/xft-megatron/eval)")
    _add_layout_flags(lo, "to run the loss evaluation with (torchrun)")
    lo.set_defaults(func=_eval_loss)

    he = esub.add_parser("humaneval", help="HumanEval pass@k, every sample run in the sandbox")
    he.add_argument("--model", "--ckpt", dest="model", required=True,
                    help="HF directory, Hub id org/name[@revision] or dense Megatron checkpoint")
    he.add_argument("--n", type=int, default=1, help="samples per task (1 = greedy)")
    he.add_argument("--limit", type=int, default=None, help="first K tasks only")
    he.add_argument("--temperature", type=float, default=0.2, help="when --n > 1")
    he.add_argument("--max-new-tokens", type=int, default=512)
    he.add_argument("--workers", type=int, default=2, help="sandboxed runs at once")
    he.add_argument("--prompt", default="auto", choices=["auto", "raw", "magicoder", "chat"],
                    help="prompting protocol (eval/prompts.py): magicoder = the paper's, for "
                    "instruction-tuned models; raw = code completion, for base models; chat = "
                    "the tokenizer's chat template. auto: raw for a Megatron checkpoint of the "
                    "pretrain stage, else magicoder")
    he.add_argument("--problems", default=None,
                    help="HumanEval-format .jsonl[.gz] (default: the bundled 164)")
    he.add_argument("--out", default=None, help="output folder")
    he.set_defaults(func=_humaneval)

    dp = sub.add_parser("data", help="data tools")
    dsub = dp.add_subparsers(dest="data_command", required=True)
    mc = dsub.add_parser("mine-code", help="instruction pairs from functions with docstrings "
                         "in a Python source tree, split train/held-out by module")
    from xft_megatron.data.mine_code import add_arguments

    add_arguments(mc)
    mc.set_defaults(func=_data)

    c = sub.add_parser("config", help="print a config after YAML + overrides + validation")
    c.add_argument("config", nargs="?", help="YAML file")
    c.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    c.set_defaults(func=_config)
    return p


def _quiet_dependency_warnings():
    """Megatron-Core warns at import about absent TE/apex (both optional here) and torch about
    APIs Megatron still calls; none of it is actionable for a user of this tool."""
    for module in (r"megatron\..*", r"torch\.distributed\..*"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", message=".*\\.grad attribute of a Tensor that is not a leaf")
    # logged once per run by Megatron itself: GPTModel's deprecation in favour of HybridModel
    # (GPTModel is the model this project builds), and its own synchronous save going through
    # its deprecated async writer (not a setting of ours)
    # and torch's note, on a machine with CUDA_HOME set but no GPU, that it has no CUDA runtime
    for name, quiet in (("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
                        ("megatron.core.dist_checkpointing.strategies.torch",
                         "MCore's async save is deprecated"),
                        ("torch.utils.cpp_extension", "No CUDA runtime is found")):
        logging.getLogger(name).addFilter(_Quiet(quiet))  # a logger's own filter


class _Quiet(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _early_stop_signal(argv):
    """`xft train`: the SIGTERM handler, installed before the parser's imports pull in torch
    and Megatron (seconds), so a preemption that early still ends in a checkpoint."""
    if argv[:1] == ["train"] and "--dry-run" not in argv:
        from xft_megatron.training.signals import StopOnSignal

        return StopOnSignal()
    return None


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup is not interrupted
    raise Terminated()


def _interrupted(command: str, e: KeyboardInterrupt) -> str:
    """What a Ctrl-C (or SIGTERM: `Terminated`) left behind and how to go on, for the command
    that was stopped."""
    head = "xft: " + (f"terminated (SIGTERM){f': {e}' if str(e) else ''}"
                      if isinstance(e, Terminated) else "interrupted")
    if command == "train":
        return (f"{head}. Checkpoints written before are complete and `latest` names the "
                "newest of them; a save in progress was discarded (its partial folder "
                "removed). Continue with the same command and --resume")
    if command == "quickstart":
        return (f"{head}. Finished stages are kept; run the same command again: it reuses "
                "them and resumes a training stage from its newest checkpoint")
    if command in ("convert", "upcycle", "merge"):
        return (f"{head}. The output in progress was discarded (nothing partial is left); "
                "run the same command again")
    return head


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    stop = _early_stop_signal(argv)
    _quiet_dependency_warnings()
    args = build_parser().parse_args(argv)
    args.stop = stop
    if getattr(args, "config", None) and "=" in args.config \
            and not args.config.endswith((".yaml", ".yml")):  # overrides without a file
        args.overrides = [args.config] + args.overrides
        args.config = None
    # SIGTERM ends every other command as Ctrl-C does: cleaned up, and said (main thread only;
    # the previous handler is back afterwards, for callers that run commands in-process)
    previous = signal.signal(signal.SIGTERM, _terminate) if stop is None and \
        threading.current_thread() is threading.main_thread() else None
    try:
        args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGINT: a checkpoint write ends with it
        print(_interrupted(args.command, e), file=sys.stderr, flush=True)
        return 143 if isinstance(e, Terminated) else 130
    except ConfigError as e:
        print(f"xft: config error: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:  # data, checkpoint, HF format, a held directory, a NaN loss, ...
        print(f"xft: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the machine's side: a missing or unwritable path, a full disk
        print(f"xft: {e}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
