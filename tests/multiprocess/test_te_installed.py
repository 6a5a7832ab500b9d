"""Transformer Engine installed but not chosen. These tests run only where TE imports (CPU
included: `scripts/te_here.sh test`); elsewhere they are skipped, as the GPU tests are
without a GPU.

When TE is importable, Megatron-Core switches several of its own paths to TE: fused Adam and
its multi-tensor kernels, the placeholder weight gradient, `te_general_gemm`. The default local
spec must still train exactly as it does without TE. The same tiny XFT MoE trains 3 steps
(clipping active, distributed optimizer, then `grad_accum_fusion` too) in a process where TE
imports and in one where importing it is refused. The losses and gradient norms must be
identical (fp32 on the CPU: bitwise).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")

CHILD = r"""
import importlib.abc, json, sys
if sys.argv[1] == "blocked":
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("transformer_engine", "transformer_engine_torch", "apex"):
                raise ModuleNotFoundError(f"{name} is blocked for this test", name=name)
    sys.meta_path.insert(0, Refuse())
from tests import common
from xft_megatron.training.step import train_step
from megatron.core.tensor_parallel import layers
out = {"have_te": layers.HAVE_TE}
for fuse in ("false", "true"):
    cfg = common.tiny_config("moe.num_experts=4", "moe.topk=2", "moe.router_noise=false",
                             "train.clip_grad=0.05", f"precision.grad_accum_fusion={fuse}")
    chunks, _ = common.setup(cfg)
    opt, sched = common.optimizer_for(chunks, cfg)
    steps = [train_step(chunks, opt, sched, common.microbatches(cfg, i), cfg.train.seq_length,
                        cfg.train.clip_grad) for i in range(3)]
    out[fuse] = [[s["loss"], s["grad_norm"]] for s in steps]
print("RESULT " + json.dumps(out))
"""


def _run(mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def test_training_with_te_installed_equals_training_without():
    with_te, without = _run("importable"), _run("blocked")
    assert with_te["have_te"] and not without["have_te"]
    for fuse in ("false", "true"):
        assert with_te[fuse] == without[fuse], (fuse, with_te[fuse], without[fuse])
        assert all(norm > 0.05 for _, norm in with_te[fuse])  # clipping was active
