"""The `xft` parser: each subcommand of `eval` and `convert` has only its own flags and its
own required ones, refused by argparse (exit 2, the flag named) before any work."""

import subprocess
import sys

import pytest

from xft_megatron import cli


def _refused(capsys, *argv) -> str:
    """argparse's message for a refused command line (exit 2, nothing run)."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["eval", "loss", "--ckpt", "C"], "the following arguments are required: --data"),
    (["eval", "loss", "--data", "D"], "the following arguments are required: --ckpt"),
    (["eval", "humaneval"], "the following arguments are required: --model"),
    (["eval"], "the following arguments are required: what"),
    (["convert", "hf-to-mcore", "--out", "O"], "the following arguments are required: --hf"),
    (["convert", "mcore-to-hf", "--out", "O"], "the following arguments are required: --ckpt"),
    (["convert", "gguf-to-hf", "--out", "O"], "the following arguments are required: --gguf"),
    (["convert", "hf-to-mcore", "--hf", "H"], "the following arguments are required: --out"),
    # a flag of another subcommand is not one of this one's
    (["convert", "mcore-to-hf", "--ckpt", "C", "--hf", "H", "--out", "O"],
     "unrecognized arguments: --hf"),
    (["convert", "gguf-to-hf", "--gguf", "G", "--out", "O", "--verify"],
     "unrecognized arguments: --verify"),
    (["eval", "loss", "--ckpt", "C", "--data", "D", "--limit", "3"],
     "unrecognized arguments: --limit"),
    (["eval", "humaneval", "--model", "M", "--data", "D"], "unrecognized arguments: --data"),
])
def test_eval_and_convert_refuse_what_is_not_their_own(capsys, argv, named):
    assert named in _refused(capsys, *argv)


def test_eval_and_convert_parse_as_before():
    p = cli.build_parser()
    a = p.parse_args(["eval", "loss", "--ckpt", "C", "--data", "D", "--tp", "2"])
    assert (a.command, a.what, a.ckpt, a.data, a.tp, a.split, a.micro_batch_size,
            a.func) == ("eval", "loss", "C", "D", 2, "train", 4, cli._eval_loss)
    a = p.parse_args(["eval", "humaneval", "--model", "M", "--limit", "2", "--out", "O"])
    assert (a.command, a.what, a.model, a.limit, a.n, a.max_new_tokens, a.prompt,
            a.func) == ("eval", "humaneval", "M", 2, 1, 512, "auto", cli._humaneval)
    assert p.parse_args(["eval", "humaneval", "--ckpt", "C"]).model == "C"  # as before
    for direction, source, func in (("hf-to-mcore", ("--hf", "H"), cli._hf_to_mcore),
                                    ("mcore-to-hf", ("--ckpt", "C"), cli._mcore_to_hf),
                                    ("gguf-to-hf", ("--gguf", "G"), cli._gguf_to_hf)):
        a = p.parse_args(["convert", direction, *source, "--out", "O", "--dtype", "bf16"])
        assert (a.command, a.direction, a.out, a.dtype, a.func) == (
            "convert", direction, "O", "bf16", func)


def test_the_parser_and_presets_import_no_torch():
    """`xft --help`, `xft presets` and building the parser (quickstart flags included) stay
    quick: neither torch nor Megatron is imported."""
    code = ("import sys; from xft_megatron import cli; cli.build_parser(); "
            "assert cli.main(['presets']) == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]", r.stdout[-2000:]


def test_upcycle_router_init_std_reaches_the_upcycling(monkeypatch):
    from xft_megatron.xft import checkpoints

    seen = {}
    monkeypatch.setattr(checkpoints, "upcycle_checkpoint",
                        lambda ckpt, out, moe, **kw: seen.setdefault("moe", moe) and out)
    p = cli.build_parser()
    for argv, std in ((["--router-init-std", "0.3"], 0.3), ([], 0.02)):
        seen.clear()
        a = p.parse_args(["upcycle", "--ckpt", "C", "--out", "O"] + argv)
        a.func(a)
        assert seen["moe"].router_init_std == std

