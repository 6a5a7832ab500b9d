"""A training process that kills itself (SIGKILL) at a chosen point of checkpoint writing.

    python tests/fault_child.py ROOT K [DELAY_S]

Resumes the tiny run in ROOT (which holds iter_0000002) for one more step, whose checkpoint
it writes. Every file-system operation made while `checkpoint.dist.save` runs is counted;
the K-th one (K >= 1) is replaced by SIGKILL. K = 0: no kill, and the number of operations
is printed (the count of kill points). DELAY_S instead kills at a wall-clock delay after the
save started (points inside Megatron's writer). Used by tests/e2e/test_reliability_faults.py.
"""

import os
import shutil
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAULT_STEPS = 3  # the run resumes from step 2 and saves step 3


def config(root):
    from tests import common

    return common.tiny_config("train.train_steps=4", "checkpoint.save_interval=1",
                              "checkpoint.keep=0", "train.lr_warmup_steps=1",
                              "train.clip_grad=1.0", f"checkpoint.save={root}")


def main(root: str, k: int, delay: float = 0.0) -> None:
    import torch
    from megatron.core import dist_checkpointing

    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.training.loop import train

    state = {"in_save": False, "ops": 0}
    main_pid = os.getpid()

    def counted(fn):
        def wrapper(*a, **kw):  # this process only: not the writer processes it may fork
            if state["in_save"] and os.getpid() == main_pid:
                state["ops"] += 1
                if state["ops"] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return wrapper

    for mod, name in ((os, "fsync"), (os, "rename"), (os, "replace"), (os, "makedirs"),
                      (torch, "save"), (shutil, "copy2"), (shutil, "rmtree")):
        setattr(mod, name, counted(getattr(mod, name)))
    dist_checkpointing.save = counted(dist_checkpointing.save)
    real_save = ckpt.save

    def save(*a, **kw):
        state["in_save"] = True
        if delay:
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        try:
            return real_save(*a, **kw)
        finally:
            state["in_save"] = False

    ckpt.save = save
    cfg = config(root)
    polls = []
    train(cfg, common.RandomBatches(cfg), progress=False, resume=True,
          should_stop=lambda: polls.append(1) or len(polls) == FAULT_STEPS - 2)
    print(f"OPS {state['ops']}", flush=True)


def hold_writer(marker: str, save_number: int = 2) -> None:
    """From the `save_number`-th checkpoint save on, Megatron's writer writes its pid to
    `marker` and then waits (10 min) before writing: a save in progress to interrupt.

        python -c "import tests.fault_child as f; f.hold_writer(M); f.xft(ARGS...)"
    """
    import time

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.filesystem_async import \
        FileSystemWriterAsync

    saves = [0]
    real_save, real_write = dist_checkpointing.save, FileSystemWriterAsync.write_preloaded_data

    def counting_save(*a, **kw):
        saves[0] += 1
        return real_save(*a, **kw)

    def held_write(*a, **kw):  # runs in the trainer (megatron-core 0.19 forks no writer)
        if saves[0] >= save_number:
            with open(marker, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(600)
        return real_write(*a, **kw)

    dist_checkpointing.save = counting_save
    FileSystemWriterAsync.write_preloaded_data = staticmethod(held_write)


def xft(*args) -> None:
    from xft_megatron import cli

    sys.exit(cli.main(list(args)))


if __name__ == "__main__":
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
