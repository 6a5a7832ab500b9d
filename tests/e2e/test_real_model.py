"""A real pretrained model through the whole toolchain: SmolLM2-135M-Instruct (tests/real_model.py).

One process runs the pipeline once (convert, export, upcycle, loss evaluation, MoE export,
fold, then `xft quickstart --base` from it: SFT, MoE, merge, fold, held-out loss, HumanEval)
and the tests below check what it measured:
  * hf-to-mcore --verify passes; mcore-to-hf in fp32 gives back the original tensors bitwise;
  * every HF-writing path (dense export, MoE remote-code export, merge --hf-out, HumanEval's
    conversion of dense and MoE checkpoints) declares the original's bos/eos/pad ids in config.json and
    generation_config.json, and greedy chat generation of each export equals the original's
    token for token, including where it stops (at <|im_end|>, well before the limit);
  * `xft eval loss` of the upcycled MoE equals transformers' loss of the dense original on the
    same records, tokenized here independently (magicoder and chat templates);
  * the fold of the untrained upcycle is bitwise the original;
  * HumanEval under the magicoder protocol runs end to end on the folded checkpoint;
  * `xft quickstart --base` runs the XFT pipeline from it (a short SFT lowers held-out loss).
"""

import json
import os
import shutil

import pytest
import torch

from tests.harness import run_ranks
from tests.real_model import smollm2_hf_dir

CHATS = [[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
         [{"role": "user", "content": "Say hello."}]]
MAX_NEW = 40
# 40 files: 594 training and 15 held-out records (30 files would leave no held-out module)
# (each held-out record is scored by four 135M models on two cores)
QUICKSTART = ["--sft-steps", "2", "--merge-steps", "2", "--experts", "4", "--topk", "2",
              "--moe-every", "15", "--no-ablations", "--max-files", "40", "--seq-length", "256",
              "--humaneval", "1", "--humaneval-tokens", "40", "--tune-lr", "1e-4",
              "train.micro_batch_size=2", "train.global_batch_size=4"]


def _records():
    """(train, held-out) instruction pairs mined from two stdlib modules (short ones)."""
    import sysconfig

    from xft_megatron.data.mine_code import mine_functions, module_name

    lib = sysconfig.get_paths()["stdlib"]

    def mine(names, limit):
        out = []
        for name in names:
            path = os.path.join(lib, name)
            with open(path, encoding="utf-8") as f:
                out += mine_functions(f.read(), module_name(lib, path))
        short = [r for r in out if len(r["instruction"]) + len(r["response"]) < 700]
        return short[:limit]

    return mine(["mailbox.py"], 24), mine(["calendar.py"], 8)


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _hf_reference_loss(hf_dir, records, template):
    """Mean response-token loss of the transformers model, with the tokens built here:
    magicoder = [BOS] + template prompt + response + EOS; chat = the tokenizer's chat template,
    the text up to the generation prompt and the rest tokenized apart (loss on the rest)."""
    import transformers

    from xft_megatron.data.templates import MAGICODER

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for r in records:
        if template == "magicoder":
            prompt = [tok.bos_token_id] + tok.encode(
                MAGICODER.format(instruction=r["instruction"]), add_special_tokens=False)
            ids = prompt + tok.encode(r["response"], add_special_tokens=False) + \
                [tok.eos_token_id]
        else:
            user = [{"role": "user", "content": r["instruction"]}]
            head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(user + [{"role": "assistant",
                                                    "content": r["response"]}], tokenize=False)
            assert full.startswith(head)  # the reply is tokenized on its own, as in training
            prompt = tok.encode(head, add_special_tokens=False)
            ids = prompt + tok.encode(full[len(head):], add_special_tokens=False)
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
        nll = -logp.gather(1, x[0, 1:, None])[:, 0]
        total += nll[len(prompt) - 1:].sum().item()
        count += len(ids) - len(prompt)
    return total / count


def _greedy_chats(hf_dir):
    """Token ids generated greedily for each chat, with only the directory's own settings
    (generation_config.json decides where to stop)."""
    import transformers

    from xft_megatron.hf.files import own_remote_code

    remote = own_remote_code(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, trust_remote_code=remote).eval()
    out = []
    for chat in CHATS:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _token_settings(hf_dir):
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(hf_dir, "generation_config.json")) as f:
        gen = json.load(f)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"config": {k: cfg.get(k) for k in keys}, "generation": {k: gen.get(k) for k in keys}}


def _hf_tensors(hf_dir):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, f)))
    out.pop("lm_head.weight", None)  # tied to the embedding
    return out


def _same_tensors(a_dir, b_dir):
    a, b = _hf_tensors(a_dir), _hf_tensors(b_dir)
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
                                    for k in a)


def _pipeline(rank, world, hf, root):
    torch.set_num_threads(2)
    from xft_megatron import cli
    from xft_megatron.config import MoEConfig
    from xft_megatron.eval.loss import evaluate_loss
    from xft_megatron.hf import convert
    from xft_megatron.hf.verify import compare_logits
    from xft_megatron.runtime import parallel
    from xft_megatron.xft.checkpoints import merge_checkpoint, upcycle_checkpoint

    import time

    r = {"seconds": {}}
    p = lambda *names: os.path.join(root, *names)  # noqa: E731
    t = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        r["seconds"][name] = round(now - t[0], 1)
        t[0] = now

    train, held = _records()
    _write_jsonl(p("train.jsonl"), train)
    _write_jsonl(p("held.jsonl"), held)
    r["records"] = (len(train), len(held))

    # Each folder goes once nothing further reads it (the disk may be small: tests/conftest.py
    # checks it first). Before the quickstart the most held at once is the MoE checkpoint and
    # the fold's two outputs, about 1.9 GB; the quickstart writes about 6 GB.
    r["tokens"], r["chats"] = {"original": _token_settings(hf)}, {"original": _greedy_chats(hf)}

    def check_export(name, hf_dir):
        r["tokens"][name] = _token_settings(hf_dir)
        r["chats"][name] = _greedy_chats(hf_dir)

    mc = convert.hf_to_mcore(hf, p("mc"))
    r["verify"] = compare_logits(hf, mc)
    convert.mcore_to_hf(mc, p("dense_hf"))  # the checkpoint's dtype: fp32
    r["dense_bitwise"] = _same_tensors(hf, p("dense_hf"))
    check_export("dense", p("dense_hf"))
    shutil.rmtree(p("dense_hf"))
    lap("convert, verify, export, greedy chats")

    moe = MoEConfig(num_experts=4, topk=2, layer_freq=3)
    upcycle_checkpoint(mc, p("moe"), moe, seed=0)
    shutil.rmtree(p("mc"))
    r["loss"] = {}
    for template in ("magicoder", "chat"):
        got = evaluate_loss(p("moe"), p("held.jsonl"), cache_dir=p("cache"), template=template,
                            seq_length=512)
        r["loss"][template] = (got["loss"], _hf_reference_loss(hf, held, template),
                               got["records"])
    lap("upcycle, eval loss x2")
    convert.mcore_to_hf(p("moe"), p("moe_hf"))
    check_export("moe", p("moe_hf"))
    shutil.rmtree(p("moe_hf"))
    merge_checkpoint(p("moe"), p("merged"), "uniform", 0.75, {}, report=lambda *a: None,
                     hf_out=p("merged_hf"))
    for done in ("moe", "merged"):
        shutil.rmtree(p(done))
    r["fold_bitwise"] = _same_tensors(hf, p("merged_hf"))
    check_export("merged", p("merged_hf"))
    shutil.rmtree(p("merged_hf"))
    lap("moe export, fold, greedy chats")

    # the whole XFT pipeline from this base, at a few steps: convert, SFT, upcycle, MoE SFT,
    # learnable merge, fold, held-out loss and HumanEval of every model, report
    parallel.shutdown()
    r["quickstart_rc"] = cli.main(["quickstart", "--out", p("qs"), "--base", hf] + QUICKSTART)
    with open(p("qs", "summary.json")) as f:
        r["quickstart"] = json.load(f)
    with open(p("qs", "report.md")) as f:
        r["report"] = f.read()
    # HumanEval converted each model (dense and MoE checkpoints) to HF on its way
    he = p("qs", "humaneval")
    r["tokens"].update({f"humaneval {i}": _token_settings(os.path.join(he, f"model{i}"))
                        for i in range(4)})
    r["tokens"]["quickstart --hf-out"] = _token_settings(p("qs", "xft_merged", "hf"))
    with open(os.path.join(he, "model3.json")) as f:
        r["humaneval"] = json.load(f)
    lap("quickstart --base")
    print("real-model pipeline seconds:", r["seconds"])
    return r


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    hf = smollm2_hf_dir()  # downloads on first use; a failure is an error, not a skip
    root = str(tmp_path_factory.mktemp("real"))
    yield hf, run_ranks(1, _pipeline, hf, root, timeout=1500)[0]
    shutil.rmtree(root)  # several GB: the rest of the suite needs the disk


def test_conversion_verifies_and_exports_bitwise(pipeline):
    _, r = pipeline
    v = r["verify"]
    assert v["max_abs_diff"] <= 1e-4 * max(1.0, v["logit_scale"]) and \
        v["argmax_agreement"] == 1.0, v
    assert r["dense_bitwise"]
    assert r["fold_bitwise"]  # the fold of an untrained upcycle is the original


def test_every_export_keeps_special_tokens_and_generates_like_the_original(pipeline):
    hf, r = pipeline
    want = r["tokens"]["original"]
    assert want["generation"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    for name, got in r["tokens"].items():
        assert got == want, name
    reference = r["chats"]["original"]
    for ids in reference:  # each reply ends with <|im_end|>, before the limit
        assert 0 < len(ids) < MAX_NEW and ids[-1] == 2 and 2 not in ids[:-1], reference
    for name, ids in r["chats"].items():
        assert ids == reference, name


def test_upcycled_loss_equals_transformers_dense_loss(pipeline):
    _, r = pipeline
    assert r["records"][1] >= 6
    for template, (got, ref, records) in r["loss"].items():
        assert records == r["records"][1], template
        assert abs(got - ref) <= 1e-4 * ref, (template, got, ref)


def test_humaneval_magicoder_protocol_on_the_folded_checkpoint(pipeline):
    _, r = pipeline
    assert r["quickstart_rc"] == 0
    report = r["humaneval"]
    assert report["protocol"] == "magicoder"
    for task in report["per_task"]:
        program, generation = task["programs"][0], task["completions"][0]
        assert program.startswith("from typing import List")  # the code block: prompt + body
        assert "```" not in program and "@@ Response" not in program
        assert program.endswith("\ncheck(" + ("has_close_elements" if task["task_id"] ==
                                              "HumanEval/0" else "separate_paren_groups")
                                + ")\n")
        assert generation and generation in program or "```" in generation


def test_quickstart_from_the_real_base(pipeline):
    """The XFT pipeline from an HF base: a short SFT and the MoE lower held-out loss, every
    model is scored on HumanEval, the folded model's export keeps the special tokens."""
    _, r = pipeline
    assert r["quickstart_rc"] == 0
    losses, scores = r["quickstart"]["heldout_loss"], r["quickstart"]["humaneval_pass@1"]
    models = ["base", "sft (dense)", "xft moe", "xft merged (dense)"]
    assert list(losses) == models and list(scores) == models
    for tuned in models[1:]:
        assert losses[tuned] < losses["base"] - 0.01, losses
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert "HumanEval pass@1" in r["report"] and "HF base" in r["report"]
    # the settings recorded are the tuning runs', not the converted base's defaults
    train = r["quickstart"]["config"]["train"]
    assert (train["global_batch_size"], train["seq_length"]) == (4, 256), train
    assert "every step 4 rows x 256 tokens = 1,024 token slots" in r["report"]
