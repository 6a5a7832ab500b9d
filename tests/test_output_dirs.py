"""No tool writes into another run's directory: checkpoint-writing tools refuse a non-empty
--out before any work, and `xft train` without --resume refuses a checkpoint.save that holds a
run (it would restart from step 0 and move `latest` back)."""

import pytest

from xft_megatron import convert
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.config import ConfigError, MoEConfig, load_config
from xft_megatron.training.run import check_save_dir
from xft_megatron.upcycle_merge import merge_checkpoint, upcycle_checkpoint


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "iter_0000007").mkdir(parents=True)
    (run / "latest").write_text("iter_0000007")
    return run


def test_checkpoint_tools_refuse_a_directory_holding_a_run(run_dir, tmp_path):
    missing = str(tmp_path / "no_such_source")  # refused before the source is even read
    for call in (lambda: convert.hf_to_mcore(missing, str(run_dir)),
                 lambda: convert.mcore_to_hf(missing, str(run_dir)),
                 lambda: upcycle_checkpoint(missing, str(run_dir), MoEConfig(num_experts=4,
                                                                              topk=2)),
                 lambda: merge_checkpoint(missing, str(run_dir))):
        with pytest.raises(FileExistsError, match="not empty; choose a new --out"):
            call()
    with pytest.raises(FileExistsError, match="--hf-out"):
        merge_checkpoint(missing, str(tmp_path / "new"), hf_out=str(run_dir))
    assert sorted(p.name for p in run_dir.iterdir()) == ["iter_0000007", "latest"]
    ckpt.require_empty_dir(str(tmp_path / "fresh"))  # new or empty directories are fine
    (tmp_path / "empty").mkdir()
    ckpt.require_empty_dir(str(tmp_path / "empty"))


def test_train_without_resume_refuses_an_existing_run(run_dir, tmp_path):
    cfg = lambda *extra: load_config(None, [f"checkpoint.save={run_dir}", *extra])  # noqa
    with pytest.raises(ConfigError, match=r"iter_0000007.*--resume.*checkpoint.overwrite"):
        check_save_dir(cfg(), resume=False)
    check_save_dir(cfg(), resume=True)
    check_save_dir(cfg("checkpoint.overwrite=true"), resume=False)
    check_save_dir(load_config(None, [f"checkpoint.save={tmp_path / 'other'}"]), resume=False)
