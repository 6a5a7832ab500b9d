"""`xft train` with one rank dying: rank DIE_RANK exits with status 17 in its third step.

    torchrun --nproc-per-node 4 tests/rank_fault_child.py DIE_RANK [xft train args...]

Used by tests/e2e/test_reliability_faults.py (rank failure)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    from xft_megatron import cli
    from xft_megatron.training import loop

    die_rank, args = int(sys.argv[1]), sys.argv[2:]
    real_step, calls = loop.train_step, []

    def train_step(*a, **kw):
        calls.append(1)
        if len(calls) == 3 and int(os.environ["RANK"]) == die_rank:
            print(f"FAULT rank {die_rank} exits at {time.time():.3f}", flush=True)
            os._exit(17)
        return real_step(*a, **kw)

    loop.train_step = train_step
    return cli.main(["train"] + args)


if __name__ == "__main__":
    sys.exit(main())
