"""Data pipeline: tokenizers, templates and loss masks, record errors, cache, packing, masks."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from tests import common
from xft_megatron.config import DataConfig
from xft_megatron.data import code_corpus, dataset as dataset_mod
from xft_megatron.data.dataset import build_dataset
from xft_megatron.data.packing import PackedBatches, attention_mask, first_fit, \
    needs_attention_mask
from xft_megatron.data.records import DataError
from xft_megatron.data.samples import windows
from xft_megatron.data.templates import encode_instruction, render_prompt
from xft_megatron.data.tokenizer import ByteTokenizer, load_tokenizer
from xft_megatron.training.step import make_batch

CORPUS = ["def add(a, b):\n    return a + b\n", "Write a function that adds two numbers.",
          "The quick brown fox jumps over the lazy dog.", "for i in range(10):\n    print(i)\n"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
                 "{% if m.role == 'assistant' %}</s>{% endif %}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.set_random_generator_seed(1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 50), model_writer=buf,
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   minloglevel=2, num_threads=1)
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("hf") / "tok"
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(sp_model, hf_dir):
    return {"bytes": load_tokenizer(None), "sentencepiece": load_tokenizer(sp_model),
            "hf": load_tokenizer(hf_dir)}


def write_jsonl(path, records):
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            f.write(b"\n")
    return str(path)


def data_cfg(path, **kw):
    return DataConfig(path=str(path), **kw)


def masked(ids, mask):
    return [i for i, m in zip(ids, mask) if m]


# ------------------------------------------------------------------------------ tokenizers
def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*HF tokenizer directory"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        load_tokenizer(str(tmp_path))
    b = load_tokenizer(None)
    assert (b.vocab_size, b.eos_id, b.bos_id) == (257, 256, None)
    assert b.decode(b.encode("héllo")) == "héllo"


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece", "hf"])
@pytest.mark.parametrize("template", ["magicoder", "plain"])
def test_instruction_loss_mask(tokenizers, kind, template):
    tok = tokenizers[kind]
    ids, mask = encode_instruction(tok, "Add two numbers.", "def add(a, b): return a + b",
                                   template)
    bos = [] if tok.bos_id is None else [tok.bos_id]
    prompt = bos + tok.encode(render_prompt(template, "Add two numbers."))
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])  # prompt: no loss
    assert masked(ids, mask) == tok.encode("def add(a, b): return a + b") + [tok.eos_id]
    assert ids[-1] == tok.eos_id and mask[-1] == 1
    assert len(ids) == len(mask)
    if kind == "bytes":
        expected = ("You are an exceptionally intelligent coding assistant that consistently "
                    "delivers accurate and reliable responses to user instructions.\n\n"
                    "@@ Instruction\nAdd two numbers.\n\n@@ Response\n") \
            if template == "magicoder" else "Add two numbers.\n"
        assert bytes(ids[:len(prompt)]).decode() == expected


def test_chat_loss_mask_hf_template(tokenizers):
    tok = tokenizers["hf"]
    assert tok.has_chat_template
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add two numbers."},
            {"role": "assistant", "content": "return a + b"},
            {"role": "user", "content": "Print ten numbers."},
            {"role": "assistant", "content": "for i in range(10): print(i)"}]
    ids, mask = tok.encode_chat(msgs)
    # loss exactly on the assistant turns, each with its end-of-turn EOS
    assert tok.decode(masked(ids, mask)) == "return a + b</s>for i in range(10): print(i)</s>"
    assert tok.decode(ids) == tok._tok.apply_chat_template(msgs, tokenize=False)
    runs = np.flatnonzero(np.diff([0] + mask + [0]))
    assert len(runs) == 4  # two separate trainable spans


def test_chat_plain_fallback(tokenizers):
    tok = tokenizers["sentencepiece"]
    assert not tok.has_chat_template
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a + b"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "print"}]
    ids, mask = tok.encode_chat(msgs)
    assert ids[0] == tok.bos_id and mask[0] == 0
    assert masked(ids, mask) == tok.encode("a + b") + [tok.eos_id] + tok.encode("print") + \
        [tok.eos_id]


def test_instruction_chat_template_records(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add.", "output": "a + b"}])
    ds, _ = build_dataset(data_cfg(path, template="chat"), tokenizers["hf"], 64,
                          str(tmp_path / "c"))
    ids, mask = ds[0]
    assert tokenizers["hf"].decode(ids[mask > 0].tolist()) == "a + b</s>"


# ------------------------------------------------------------------------------ records
GOOD = [{"instruction": "Add.", "response": "a + b"},
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"text": "print(1)\n"},
        {"input_ids": [5, 6, 7, 8]},
        {"problem": "Sum?", "solution": "sum(x)"}]
BAD = [(b'\xff\xfe{"text": "x"}', "not_utf8"),
       (b'{"instruction": "Add.", ', "bad_json"),
       ({"foo": 1}, "missing_fields"),
       ({"instruction": 3, "response": "x"}, "wrong_type"),
       ({"instruction": "Add.", "response": "  "}, "empty_response"),
       ({"text": ""}, "empty_text"),
       ({"input_ids": [1, 999999]}, "bad_token_id"),
       ({"instruction": "Add.", "response": "x" * 600}, "too_long")]


def bad_file(tmp_path):
    """Good records on odd lines, one bad record of each kind on even lines (and a blank)."""
    lines, where = [], {}
    for i, (record, reason) in enumerate(BAD):
        lines.append(GOOD[i % len(GOOD)])
        lines.append(record)
        where[reason] = len(lines)
    path = write_jsonl(tmp_path / "bad.jsonl", lines + [b"  "])
    return path, where


def test_bad_records_skip_reports_file_and_line(tmp_path):
    path, where = bad_file(tmp_path)
    ds, report = build_dataset(data_cfg(path, on_error="skip"), ByteTokenizer(), 256,
                               str(tmp_path / "c"))
    assert report.errors == {reason: 1 for _, reason in BAD}
    for reason, line in where.items():
        assert report.examples[reason][0].startswith(f"{path}:{line}: {reason}: ")
    assert (report.read, report.kept) == (2 * len(BAD), len(BAD))
    assert len(ds) == report.samples == len(BAD)
    table = report.table()
    assert "too_long" in table and f"{path}:{where['too_long']}" in table


def test_bad_records_fail_mode(tmp_path):
    path, where = bad_file(tmp_path)
    with pytest.raises(DataError) as e:
        build_dataset(data_cfg(path), ByteTokenizer(), 256, str(tmp_path / "c"))
    msg = str(e.value)
    assert f"{path}:{where['not_utf8']}: not_utf8" in msg and "too_long=1" in msg
    assert "data.on_error=skip" in msg
    assert not os.listdir(tmp_path / "c")  # nothing cached


def test_empty_result_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="no usable samples"):
        build_dataset(data_cfg(path, on_error="skip"), ByteTokenizer(), 256, str(tmp_path))


def test_chat_template_errors_are_record_errors(tmp_path, tokenizers):
    # a template that raises, and one whose prefix rendering is unstable ("!" on the last
    # message), are errors of the record that triggers them
    tok = tokenizers["hf"]
    real = tok._tok.chat_template
    tok._tok.chat_template = (
        "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}"
        "{% endif %}{% if loop.last and m.content == 'odd' %}!{% endif %}{{ m.content }}"
        "{% endfor %}")

    def chat(question):
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": "b"}]}

    try:
        path = write_jsonl(tmp_path / "c.jsonl", [chat("a"), chat("boom"), chat("odd")])
        _, report = build_dataset(data_cfg(path, on_error="skip"), tok, 64, str(tmp_path / "c"))
    finally:
        tok._tok.chat_template = real
    assert report.errors == {"template_error": 2} and report.kept == 1
    assert "no boom" in report.examples["template_error"][0]
    assert "not a prefix" in report.examples["template_error"][1]


def test_json_jsonl_parquet_read_alike(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", GOOD)
    (tmp_path / "d.json").write_text(json.dumps(GOOD))
    pq.write_table(pa.table({"instruction": ["Add.", None], "response": ["a + b", None],
                             "text": [None, "print(1)\n"]}), tmp_path / "d.parquet")
    tok = ByteTokenizer()
    got = {}
    for name in ("d.jsonl", "d.json", "d.parquet"):
        ds, report = build_dataset(data_cfg(tmp_path / name), tok, 256, str(tmp_path / "c"))
        assert report.errors == {}
        got[name] = [tuple(ds[i][0]) for i in range(len(ds))]
    assert got["d.jsonl"] == got["d.json"] and len(got["d.jsonl"]) == len(GOOD)
    assert set(got["d.parquet"]) <= set(got["d.jsonl"]) and len(got["d.parquet"]) == 2
    with pytest.raises(DataError, match=r"d2.json.*line 1"):
        (tmp_path / "d2.json").write_text("[{]")
        build_dataset(data_cfg(tmp_path / "d2.json"), tok, 64, str(tmp_path / "c"))


def test_input_ids_kept_exactly_and_text_windows(tmp_path):
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    text = "x" * 50
    path = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": ids}, {"text": text}])
    ds, report = build_dataset(data_cfg(path), ByteTokenizer(), 16, str(tmp_path / "c"))
    got, mask = ds[0]
    assert got.tolist() == ids and mask.tolist() == [0] + [1] * 7
    # text: 51 tokens (text + EOS) in windows of 17, overlapping by one token
    pieces = [ds[i] for i in range(1, len(ds))]
    assert all(len(p[0]) <= 17 for p in pieces) and len(pieces) == 4
    joined = pieces[0][0].tolist() + sum((p[0][1:].tolist() for p in pieces[1:]), [])
    assert joined == list(text.encode()) + [256]
    assert sum(int(p[1].sum()) for p in pieces) == len(joined) - 1  # each target once
    assert report.samples == len(ds) and report.tokens == ds.num_tokens


def test_windows_cover_every_target_once():
    for n in range(1, 40):
        w = windows(list(range(n)), 7)
        targets = [t for ids, m in w for t, k in zip(ids, m) if k]
        assert targets == list(range(1, n)) and all(len(ids) <= 8 for ids, _ in w)


KEYS = ["text", "instruction", "response", "output", "problem", "solution", "messages",
        "role", "content", "input_ids", "input"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["user", "assistant", "system"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner,
                                                                max_size=4),
    max_leaves=12)
LINES = st.one_of(st.binary(max_size=40),
                  JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                  st.sampled_from([b"{", b"[1, 2", b'"\\ud800"', b'{"text": "\\udc00"}',
                                   b"[" * 5000, b"\xef\xbb\xbf{}", b"NaN", b"1e999"]))


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(lines=st.lists(LINES, min_size=1, max_size=8), on_error=st.sampled_from(["skip", "fail"]))
def test_fuzz_records_only_raise_data_error(tmp_path_factory, lines, on_error):
    tmp = tmp_path_factory.mktemp("fuzz")
    lines = [ln.replace(b"\n", b" ") for ln in lines]
    path = write_jsonl(tmp / "f.jsonl", lines)
    records = sum(1 for i, ln in enumerate(lines)
                  if (ln[3:] if i == 0 and ln.startswith(b"\xef\xbb\xbf") else ln).strip())
    try:
        _, report = build_dataset(data_cfg(path, on_error=on_error), ByteTokenizer(), 32,
                                  str(tmp / "c"))
    except DataError as e:
        msg = str(e)
        assert f"of {records} records are bad" in msg or f"{records} records read" in msg
        msg.encode("utf-8")  # printable
        return
    assert report.read == records == report.kept + report.dropped
    assert on_error == "skip" or report.dropped == 0


# ------------------------------------------------------------------------------ cache
def test_cache_reuse_without_retokenizing(tmp_path, monkeypatch, sp_model):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD * 3 + [{"text": "bad"}, {"foo": 1}])
    cfg = data_cfg(path, on_error="skip")
    tok = load_tokenizer(sp_model)
    first, r1 = build_dataset(cfg, tok, 256, str(tmp_path / "c"))
    assert not r1.from_cache and r1.errors == {"missing_fields": 1}

    def no_tokenizing(*a, **k):
        raise AssertionError("retokenized")

    monkeypatch.setattr(dataset_mod, "example_samples", no_tokenizing)
    second, r2 = build_dataset(cfg, tok, 256, str(tmp_path / "c"))
    assert r2.from_cache and second.from_cache and r2.to_dict() == r1.to_dict()
    assert len(first) == len(second)
    for i in range(len(first)):
        assert all(np.array_equal(a, b) for a, b in zip(first[i], second[i]))
    assert "from cache" in r2.table()
    # any input that changes the samples misses the cache
    with pytest.raises(AssertionError, match="retokenized"):
        build_dataset(data_cfg(path, on_error="skip", template="plain"), tok, 256,
                      str(tmp_path / "c"))
    with pytest.raises(AssertionError, match="retokenized"):
        build_dataset(cfg, tok, 512, str(tmp_path / "c"))
    os.utime(path, ns=(1, 1))
    with pytest.raises(AssertionError, match="retokenized"):
        build_dataset(cfg, tok, 256, str(tmp_path / "c"))


def test_builtin_stdlib(tmp_path, monkeypatch):
    real = code_corpus.python_files
    monkeypatch.setattr(code_corpus, "python_files", lambda root: real(root, limit=4))
    ds, report = build_dataset(DataConfig(path="builtin:stdlib"), ByteTokenizer(), 128,
                               str(tmp_path))
    assert report.kept == report.read and report.errors == {} and len(ds) >= report.read


def test_preprocess_tool(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "preprocess_data", os.path.join(common.REPO, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [{"foo": 1}])
    args = ["--data", path, "--seq-length", "256", "--out", str(tmp_path / "c")]
    assert tool.main(args) == 1 and "data.on_error=skip" in capsys.readouterr().err
    assert tool.main(args + ["--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "missing_fields" in out and f"{len(GOOD)} samples" in out


# ------------------------------------------------------------------------------ packing
class Samples:
    """Sample i: ids all equal to 1000 + i, loss on every token but the first."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        n = int(self.lengths[i])
        return np.full(n, 1000 + i), np.ones(n, dtype=np.float32)


def naive_first_fit(lengths, order, capacity):
    rows, room = [], []
    for i in order:
        for r in range(len(rows)):
            if room[r] >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def test_first_fit_matches_definition():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 257):
        lengths = rng.integers(1, 33, n)
        order = rng.permutation(n)
        assert first_fit(lengths, order, 33) == naive_first_fit(lengths, order, 33)


def epoch_rows(batches, epoch):
    """(sample, row contents) of every packed row of an epoch, checking row invariants."""
    seen = []
    for step in range(epoch * len(batches), (epoch + 1) * len(batches)):
        b = batches[step]
        tok, mask, seg = b["tokens"], b["loss_mask"], b["segment_ids"]
        assert tok.dtype == torch.int64 and seg.dtype == torch.int64
        assert mask.dtype == torch.float32 and tok.shape == (4, 33)
        for r in range(tok.shape[0]):
            s = seg[r].tolist()
            used = sum(1 for x in s if x)
            assert all(x == 0 for x in s[used:])  # padding only at the end
            assert s[:used] == sorted(s[:used]) and (not used or s[0] == 1)
            assert set(s[:used]) == set(range(1, max(s[:used], default=0) + 1))
            for k in set(s[:used]):
                pos = [p for p in range(used) if s[p] == k]
                ids = tok[r, pos]
                assert (ids == ids[0]).all()  # one sample per segment
                assert mask[r, pos[0]] == 0 and (mask[r, pos[1:]] == 1).all()
                seen.append((int(ids[0]) - 1000, len(pos)))
            assert (mask[r, used:] == 0).all()
    return seen


@pytest.mark.parametrize("packing", [True, False])
def test_packing_epoch_covers_every_sample_once(packing):
    lengths = np.random.default_rng(1).integers(1, 34, 61)
    data = Samples(lengths)
    batches = PackedBatches(data, 32, 4, seed=5, packing=packing)
    for epoch in (0, 1):
        seen = epoch_rows(batches, epoch)
        assert sorted(seen) == [(i, int(n)) for i, n in enumerate(lengths)]
    if packing:
        assert len(batches) < len(PackedBatches(data, 32, 4, seed=5, packing=False))
    else:
        assert len(batches) == -(-61 // 4)
        assert all(int(batches[s]["segment_ids"].max()) <= 1 for s in range(len(batches)))


def test_packing_deterministic_per_step_and_reshuffled_per_epoch():
    data = Samples(np.random.default_rng(2).integers(1, 20, 80))
    a, b = PackedBatches(data, 32, 4, seed=3), PackedBatches(data, 32, 4, seed=3)
    n = len(a)
    for step in (n + 1, 0, 2 * n + 3, 1):  # any order: a pure function of the step
        for key in ("tokens", "loss_mask", "segment_ids"):
            assert torch.equal(a[step][key], b[step][key])
    assert not all(torch.equal(a[s]["tokens"], a[n + s]["tokens"]) for s in range(n))
    c = PackedBatches(data, 32, 4, seed=4)
    assert not all(torch.equal(a[s]["tokens"], c[s]["tokens"]) for s in range(min(n, len(c))))
    with pytest.raises(ValueError, match="more than seq_length"):
        PackedBatches(Samples([40]), 32, 4, seed=0)


def test_packed_dataset_end_to_end(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD * 4)
    ds, _ = build_dataset(data_cfg(path), ByteTokenizer(), 256, str(tmp_path / "c"))
    batches = PackedBatches(ds, 256, 2, seed=0)
    total = sum(int((batches[s]["segment_ids"] > 0).sum()) for s in range(len(batches)))
    assert total == ds.num_tokens
    assert int(batches[0]["tokens"][batches[0]["segment_ids"] == 0].unique().numel()) <= 1


# ------------------------------------------------------------------------------ attention
def test_attention_mask_block_diagonal_causal():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    allowed = torch.zeros(8, 8, dtype=torch.bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6), (6, 8)):
        allowed[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    m = attention_mask(seg)
    assert m.shape == (1, 1, 8, 8) and m.dtype == torch.bool
    assert torch.equal(m[0, 0], ~allowed)
    assert needs_attention_mask(seg)
    assert not needs_attention_mask(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert needs_attention_mask(torch.tensor([[1, 1, 0, 1]]))


def test_packed_attention_equals_separate_samples():
    # SDPA with the mask (as model/attention.py applies it) == each sample on its own
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0]])
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask(seg))
    for lo, hi in ((0, 3), (3, 7)):
        alone = F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi],
                                               is_causal=True)
        torch.testing.assert_close(packed[:, :, lo:hi], alone)


def test_make_batch_packed_and_plain():
    data = Samples([5, 9, 4, 12, 7, 3])
    raw = PackedBatches(data, 16, 2, seed=0)[0]
    batch = make_batch(raw)
    assert torch.equal(batch["tokens"], raw["tokens"][:, :-1])
    assert torch.equal(batch["labels"], raw["tokens"][:, 1:])
    assert torch.equal(batch["loss_mask"], raw["loss_mask"][:, 1:])
    assert torch.equal(batch["segment_ids"], raw["segment_ids"][:, :-1])
    assert batch["position_ids"].tolist() == [list(range(16))] * 2
    # a label is trained only where it continues the same sample
    same = raw["segment_ids"][:, 1:] == raw["segment_ids"][:, :-1]
    assert ((batch["loss_mask"] > 0) <= same).all()
    single = PackedBatches(data, 16, 2, seed=0, packing=False)[0]
    assert "segment_ids" not in make_batch(single)
    plain = make_batch(torch.arange(18).reshape(2, 9))
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert plain["loss_mask"].shape == (2, 8) and bool((plain["loss_mask"] == 1).all())


def _packed_model_body(rank, world):
    cfg = common.tiny_config("model.init_std=0.2")
    chunks, _ = common.setup(cfg, ddp=False)
    model = chunks[0].eval()
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, cfg.model.vocab_size, (n,), generator=g) for n in (9, 14, 7)]

    class Data:
        lengths = np.array([len(s) for s in samples])

        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i].numpy(), np.ones(len(samples[i]), dtype=np.float32)

    raw = PackedBatches(Data(), cfg.train.seq_length, 1, seed=0)[0]
    batch = make_batch(raw)
    seg = raw["segment_ids"][0, :-1]
    from xft_megatron.training.step import forward_logits

    with torch.no_grad():  # through the training step's forward: the mask is wired in
        packed = forward_logits(chunks, [batch], cfg.train.seq_length)
        errs = []
        for k in range(1, int(seg.max()) + 1):
            pos = torch.nonzero(seg == k).flatten()
            ids = batch["tokens"][:, pos]
            alone = model(ids, torch.arange(len(pos)).unsqueeze(0), None)
            errs.append(((packed[:, pos] - alone).abs().max() / alone.abs().max()).item())
    return errs


def test_packed_rows_through_the_model_equal_separate_samples():
    # with the segment mask, position ids 0..s-1 along the row (RoPE: relative) give each
    # sample the logits it has on its own
    from tests.harness import run_ranks

    errs = run_ranks(1, _packed_model_body)[0]
    assert len(errs) >= 2 and max(errs) < 1e-5, errs


def test_a_damaged_cache_entry_is_found_and_rebuilt(tmp_path, capfd):
    """The tokenized cache's files carry their sizes and crc32: a truncated file, a flipped
    byte or a missing file is reported and the entry tokenized again (the same samples); an
    intact entry loads from the cache."""
    write_jsonl(tmp_path / "d.jsonl", GOOD)
    tok, cache = ByteTokenizer(), str(tmp_path / "c")

    def build():
        ds, report = build_dataset(data_cfg(tmp_path / "d.jsonl"), tok, 256, cache)
        return [(tuple(ds[i][0]), tuple(ds[i][1])) for i in range(len(ds))], report.from_cache

    first, cached = build()
    assert not cached and build() == (first, True)
    (entry,) = [os.path.join(cache, n) for n in os.listdir(cache)]

    def damage_ids_tail():
        with open(os.path.join(entry, "ids.bin"), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(entry, "ids.bin")) - 4)

    def flip_a_mask_byte():
        with open(os.path.join(entry, "mask.bin"), "r+b") as f:
            f.seek(3)
            byte = f.read(1)
            f.seek(3)
            f.write(bytes([byte[0] ^ 1]))

    def lose_offsets():
        os.remove(os.path.join(entry, "offsets.npy"))

    for damage, said in ((damage_ids_tail, "ids.bin has"), (flip_a_mask_byte, "mask.bin differs"),
                         (lose_offsets, "offsets.npy")):
        capfd.readouterr()
        damage()
        assert build() == (first, False), damage.__name__  # tokenized again, same samples
        err = capfd.readouterr().err
        assert "are damaged" in err and said in err, (damage.__name__, err)
        assert build() == (first, True)
    assert os.listdir(cache) == [os.path.basename(entry)]  # nothing left aside
