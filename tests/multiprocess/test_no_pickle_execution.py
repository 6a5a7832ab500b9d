"""Reading a checkpoint runs no code: a pickle payload planted in a training checkpoint's
rank state or common state (checksums re-hashed, so only the content says it is foreign) is
refused on `--resume` with a message naming the file, and the payload never runs. Every
object is read with `torch.load(weights_only=True)`: our own per-rank state (RNG streams)
holds tensors and plain values only, Megatron's common state and stored objects are read
through `compat.patches.plain_data_loads`."""

import io
import os
import random

import numpy as np
import pytest
import torch

from tests.harness import run_ranks

RUN = ["train.train_steps=2", "checkpoint.keep=0"]


class Payload:
    """Unpickled, it writes `marker`: what a planted pickle could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _plant(folder, name, marker):
    """Replace FOLDER/NAME by a pickle holding a payload and re-hash the checksum manifest the
    way a save writes it."""
    from xft_megatron.checkpoint import checksums

    path = os.path.join(folder, name)
    original = torch.load(path, weights_only=True) if name.endswith("rank_00000.pt") else {}
    torch.save({**original, "x": Payload(marker)} if isinstance(original, dict)
               else Payload(marker), path)
    checksums.write_manifest(folder, {})


def _body(rank, world, root):
    from tests import common
    from xft_megatron.checkpoint import dist as ckpt
    from xft_megatron.errors import UserError
    from xft_megatron.training.loop import train

    out = {}
    for name in ("rank_state/rank_00000.pt", "common.pt"):
        save = os.path.join(root, name.split("/")[0])
        cfg = common.tiny_config(*RUN, f"checkpoint.save={save}")
        train(cfg, common.RandomBatches(cfg), progress=False)
        marker = os.path.join(root, f"ran_{name.replace('/', '_')}")
        _plant(ckpt.resolve(save), name, marker)
        more = common.tiny_config(*RUN, f"checkpoint.save={save}", "train.train_steps=3")
        try:
            train(more, common.RandomBatches(more), progress=False, resume=True)
            out[name] = (None, os.path.exists(marker))
        except UserError as e:
            out[name] = (str(e), os.path.exists(marker))
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    return run_ranks(1, _body, str(tmp_path_factory.mktemp("pickles")))[0]


@pytest.mark.parametrize("name", ["rank_state/rank_00000.pt", "common.pt"])
def test_a_planted_pickle_is_refused_on_resume_and_never_runs(resumed, name):
    message, ran = resumed[name]
    assert not ran, f"the payload in {name} ran"
    assert message is not None, f"resume read {name} without complaint"
    assert "pickled object" in message and "(it names exec)" in message and \
        "another iter_* folder" in message, message
    assert "weights_only" not in message, message  # no advice to read it anyway
    if name == "common.pt":
        assert "common.pt" in message, message
    else:
        assert "rank_00000.pt" in message, message


def test_stored_objects_of_a_torch_dist_checkpoint_are_read_as_data(tmp_path):
    """torch's load planner unpickles stored objects with weights_only=False; under
    plain_data_loads the same call refuses the payload."""
    from torch.distributed.checkpoint import default_planner

    from xft_megatron.runtime.compat.patches import plain_data_loads

    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"param_groups": [{"lr": 1e-3}], "x": Payload(str(marker))}, buf)
    plain = io.BytesIO()
    torch.save({"param_groups": [{"lr": 1e-3}], "step": torch.tensor(3)}, plain)
    with plain_data_loads():
        buf.seek(0)
        with pytest.raises(Exception) as e:
            default_planner.torch.load(buf, weights_only=False)
        plain.seek(0)
        assert default_planner.torch.load(plain, weights_only=False)["step"].item() == 3
    assert getattr(e.value, "where", None) == "a stored object"
    assert not marker.exists()
    assert default_planner.torch is torch  # reverted


def test_rng_state_round_trips_through_plain_data(tmp_path):
    """The RNG state is saved as tensors and plain values and restores every stream exactly;
    rank state written before (NumPy arrays, Python tuples) still reads."""
    from xft_megatron.checkpoint.dist import read_plain_data
    from xft_megatron.training import rng

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    path = str(tmp_path / "rank.pt")
    torch.save({"rng": rng.capture()}, path)
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    rng.restore(read_plain_data(path, str(tmp_path))["rng"])
    assert (random.random(), np.random.rand(), np.random.randn()) == expected[:3]
    assert torch.equal(torch.rand(2), expected[3])
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state(), "tracker": {}}
    torch.save({"rng": legacy}, path)
    expected = (random.random(), np.random.rand())
    rng.restore(read_plain_data(path, str(tmp_path))["rng"])
    assert (random.random(), np.random.rand()) == expected
