"""What a run's checkpoints need on disk, checked before anything is built.

A torch_dist training checkpoint holds every parameter in the training dtype plus, for the
parameters that train, the distributed optimizer's state in fp32: the main copy and Adam's two
moments, 12 bytes per parameter whatever the dtype (measured: SmolLM2-135M trained in fp32,
2,052 MiB predicted, 2,058 MiB on disk). The merge stage trains only its coefficients, so its
checkpoints are weights alone; `checkpoint.final_optimizer=false` makes the final one so too.
"""

from typing import Dict

from xft_megatron.checkpoint import space
from xft_megatron.config import Config
from xft_megatron.errors import ConfigError
from xft_megatron.training.memory import parameter_counts

OPTIMIZER_BYTES = 12  # fp32 main parameter + exp_avg + exp_avg_sq


def checkpoint_bytes(cfg: Config) -> Dict[str, int]:
    """{'weights', 'optimizer'}: bytes of one training checkpoint of `cfg`, all ranks."""
    total = parameter_counts(cfg.model, cfg.moe)["total"]
    trained = 0 if cfg.stage == "merge" else total
    return {"weights": total * cfg.precision.width, "optimizer": trained * OPTIMIZER_BYTES}


def saves_in_run(cfg: Config) -> int:
    """How many checkpoints a run from step 0 writes (interval saves and the final one)."""
    c, steps = cfg.checkpoint, cfg.train.train_steps
    periodic = steps // c.save_interval if c.save_interval else 0
    last_is_periodic = c.save_interval and steps % c.save_interval == 0
    return periodic + (1 if c.final and not last_is_periodic else 0)


def run_bytes(cfg: Config) -> Dict[str, int]:
    """{'first', 'peak', 'kept', 'at_once'}: bytes of the run's first checkpoint, the most its
    checkpoints hold at once (during a save, the one being written next to those kept), what
    they hold once it has finished, and how many checkpoints the peak is; all 0 when it saves
    nothing."""
    c = cfg.checkpoint
    saves = saves_in_run(cfg) if c.save else 0
    if c.save and c.save_interval and cfg.train.epochs is not None:
        # the step count comes from the data, read after this check: taken as long enough
        # for the interval saves to fill checkpoint.keep (two at least when it keeps all)
        saves = max(saves, c.keep + 1 if c.keep else 2)
    if saves == 0:
        return {"first": 0, "peak": 0, "kept": 0, "at_once": 0}
    size = checkpoint_bytes(cfg)
    full = size["weights"] + size["optimizer"]
    final = size["weights"] if not c.final_optimizer else full
    first = final if not c.save_interval else full
    coexisting = saves if c.keep == 0 else min(saves, c.keep + 1)
    kept = saves if c.keep == 0 else min(saves, c.keep)
    return {"first": first, "peak": (coexisting - 1) * full + final,
            "kept": (kept - 1) * full + final, "at_once": coexisting}


def check_room(cfg: Config, free: int) -> str:
    """Refuse a run whose first checkpoint cannot fit in `free` bytes, naming what it needs
    and how to make room; '' when the whole run fits, else a notice saying at which point the
    kept checkpoints (checkpoint.keep, plus the one being written) stop fitting."""
    c = cfg.checkpoint
    need = run_bytes(cfg)
    if need["peak"] == 0:
        return ""
    size = checkpoint_bytes(cfg)
    full = size["weights"] + size["optimizer"]
    only_final = not c.save_interval
    first = need["first"]
    if first > free:
        raise ConfigError(
            f"checkpoint.save='{c.save}': a checkpoint of this run needs ~{space.human(first)}"
            f" (weights {space.human(size['weights'])}"
            + (f", optimizer state {space.human(size['optimizer'])}" if first == full and
               size["optimizer"] else "")
            + f"), but its disk has {space.human(free)} free. Free space there or choose "
            "another checkpoint.save"
            + ("; checkpoint.final_optimizer=false saves the weights alone" if
               only_final and c.final_optimizer and size["optimizer"] else ""))
    if need["peak"] <= free:
        return ""
    return (f"notice: checkpoint.save='{c.save}' has {space.human(free)} free; the first "
            f"checkpoint fits, but the {need['at_once']} this run keeps at once need "
            f"~{space.human(need['peak'])}: a later save will fail (lower checkpoint.keep or "
            "raise checkpoint.save_interval)")
