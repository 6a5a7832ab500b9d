"""Helpers and constants shared by tests: the repository's root, `xft` in a child process
(`xft_process`) and in this one (`run_cli`), tiny configs, deterministic batches, model set-up
per layout. Importing it loads torch, not Megatron-Core (the helpers that need Megatron import
it when called), so any test file can take its constants from here."""

import contextlib
import io
import os
import subprocess
import sys
import traceback
from typing import NamedTuple, Optional

import torch

from xft_megatron.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
XFT = [sys.executable, "-m", "xft_megatron.cli"]  # the `xft` command, for a child process


def sigint_as_usual() -> None:
    """`preexec_fn` for a child that a test interrupts with SIGINT: a shell's background job
    (and so everything it starts) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler; the child gets the default disposition back, as in a terminal."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def xft_process(*argv, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`xft ARGV` in a child process, output captured as text (`subprocess.run` kwargs pass
    through)."""
    return subprocess.run(XFT + [str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


class CliRun(NamedTuple):
    """What `xft ARGV` did in this process (`run_cli`)."""

    code: Optional[int]  # its exit code; None when an exception escaped cli.main (catch=True)
    out: str  # what it printed to stdout
    err: str  # ... and to stderr; the traceback instead when an exception escaped

    @property
    def text(self) -> str:
        """stdout, then stderr."""
        return self.out + self.err


def run_cli(*argv, catch: bool = False) -> CliRun:
    """`xft ARGV` run in this process through `cli.main` (each argument str()-ed), its stdout
    and stderr captured. An exception escaping `cli.main` propagates; with `catch`, it comes
    back as code None with its traceback in `err` (for tests where any escape is a finding)."""
    from xft_megatron import cli

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in argv])
    except BaseException:  # noqa: BLE001 - with catch, whatever escapes is the result
        if not catch:
            raise
        return CliRun(None, out.getvalue(), traceback.format_exc())
    return CliRun(code, out.getvalue(), err.getvalue())


BASE = ["model.preset=tiny", "train.seq_length=32", "train.micro_batch_size=1",
        "train.global_batch_size=4", "train.lr=1e-3", "train.lr_decay_style=constant",
        "train.clip_grad=0.0"]


TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 tie_word_embeddings=False)


def tiny_hf_llama(folder: str, seed: int = 0, save: Optional[dict] = None, **config):
    """A tiny randomly initialized transformers Llama (TINY_LLAMA with `config` on top, seeded)
    saved as safetensors into `folder` (`save`: extra save_pretrained arguments, e.g.
    max_shard_size); returns the model (fp32, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{**TINY_LLAMA, **config})).float().eval()
    model.save_pretrained(folder, safe_serialization=True, **(save or {}))
    return model


def tiny_config(*overrides):
    return load_config(None, BASE + list(overrides))


def global_batch(cfg, step=0):
    from xft_megatron.training.step import make_batch

    g = torch.Generator().manual_seed(1000 + step)
    toks = torch.randint(0, cfg.model.vocab_size,
                         (cfg.train.global_batch_size, cfg.train.seq_length + 1), generator=g)
    return make_batch(toks)


class RandomBatches:
    """Uniform random token batches, batch i a pure function of i (a data source for `train`)."""

    def __init__(self, cfg, seed=1000):
        self.cfg, self.seed = cfg, seed

    def __getitem__(self, step):
        g = torch.Generator().manual_seed(self.seed + step)
        t = self.cfg.train
        return torch.randint(0, self.cfg.model.vocab_size,
                             (t.global_batch_size, t.seq_length + 1), generator=g)


def microbatches(cfg, step=0):
    from xft_megatron.training.step import split_global_batch

    return split_global_batch(global_batch(cfg, step), cfg.train.micro_batch_size)


def setup(cfg, weights=None, seed=7, ddp=True, distributed_optimizer=True):
    """Initialize the layout of `cfg`, build the model, load `weights` (a checkpoint) and
    wrap it in DDP. Returns (chunks, transformer_config)."""
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.model.builder import build_model, transformer_config
    from xft_megatron.runtime import parallel
    from xft_megatron.training.optimizer import wrap_ddp

    parallel.initialize(cfg.parallel, seed=seed)
    tc = transformer_config(cfg)
    chunks = build_model(cfg, tc)
    if weights:  # the merge stage may start from an MoE checkpoint (no alphas yet)
        ckpt.load(chunks, weights, may_lack=("mlp.alpha",) if cfg.stage == "merge" else ())
    if ddp:
        chunks = wrap_ddp(chunks, tc, cfg.precision, distributed_optimizer)
    return chunks, tc


def initial_weights(cfg, path: str) -> str:
    """A freshly initialized model of `cfg` saved as a checkpoint at `path` (returned), for
    runs that must start from the same weights under different settings."""
    from xft_megatron.checkpoint import dist as ckpt

    chunks, _ = setup(cfg, ddp=False)
    ckpt.save(chunks, path, 0, cfg)
    return path


def optimizer_for(chunks, cfg):
    from xft_megatron.training.optimizer import build_optimizer, build_scheduler

    opt = build_optimizer(chunks, cfg.train, cfg.precision)
    return opt, build_scheduler(opt, cfg.train)


def grads_into_params(chunks):
    """Overwrite each parameter with its reduced gradient (to save grads as a checkpoint)."""
    with torch.no_grad():
        for c in chunks:
            for p in c.module.parameters():
                p.copy_(p.main_grad.to(p.dtype))


def perturb_norms(chunks, seed=3):
    """Give RMSNorm weights non-trivial values so their gradients and effects are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in chunks:
            for name, p in c.named_parameters():
                if "layernorm" in name:
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def p5_run(cfg, weights, workdir, name, steps=3, measure=None):
    """P5 quantities of `cfg`'s layout from the checkpoint `weights`: the LM loss of one
    forward-backward (without DDP's distributed optimizer), the per-layer router losses, and
    the reduced gradients saved as the checkpoint `workdir/grads_<name>` (read back unsharded
    by `gradient_errors`); then a `steps`-step loss curve with its gradient norms from the same
    weights. `measure(chunks) -> dict` adds what it returns, taken right after the
    forward-backward (routing statistics must be collected before the router losses)."""
    import os

    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.model.moe import losses as moe_losses
    from xft_megatron.training.step import forward_backward, train_step

    chunks, _ = setup(cfg, weights, distributed_optimizer=False)
    loss = forward_backward(chunks, microbatches(cfg), cfg.train.seq_length)
    extra = measure(chunks) if measure else {}
    router = moe_losses.collect(chunks, cfg.model.num_layers)
    grads_into_params(chunks)
    ckpt.save(chunks, os.path.join(workdir, f"grads_{name}"), 0, cfg)
    chunks, _ = setup(cfg, weights)
    opt, sched = optimizer_for(chunks, cfg)
    run = [train_step(chunks, opt, sched, microbatches(cfg), cfg.train.seq_length,
                      cfg.train.clip_grad) for _ in range(steps)]
    return {"loss": loss, "router": router.tolist(), "curve": [s["loss"] for s in run],
            "norms": [s["grad_norm"] for s in run], **extra}


def hf_tensors(folder):
    """Every tensor of the safetensors files in an HF folder, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def gradient_errors(cfg, grads_ckpt, ref):
    """Read a checkpoint of gradients back unsharded (layout of `cfg`: TP=PP=EP=1, every
    rank holds full tensors) and compare with `ref` per tensor: (worst name, its rel err)."""
    from xft_megatron.checkpoint import dist as ckpt

    chunks, _ = setup(cfg, grads_ckpt, ddp=False)
    got = ckpt.local_state_dict(chunks)
    assert set(got) == set(ref), set(got) ^ set(ref)
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    worst = max(errs, key=errs.get)
    return worst, errs[worst]
