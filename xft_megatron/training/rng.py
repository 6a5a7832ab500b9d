"""Every random stream a training step draws from, captured and restored as one object, so a
resumed run continues with exactly the random numbers the uninterrupted run would have used
(noisy gating, dropout).

The captured state holds tensors and plain values only (dicts, strings, numbers), so it is
saved with `torch.save` and read back with `torch.load(weights_only=True)`, which runs no
code: Python's `random` state and NumPy's `RandomState` tuple are stored as their numbers.
"""

import random
from typing import Dict

import numpy as np
import torch
from megatron.core import tensor_parallel


def capture() -> Dict:
    version, words, gauss = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: Dict) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):  # else the tuples of checkpoints written before (same numbers)
        py = (py["version"], tuple(py["state"].tolist()), py["gauss"])
    if isinstance(npy, dict):
        npy = (npy["algorithm"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
               npy["has_gauss"], npy["cached"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
