"""A small sentencepiece tokenizer for code, trained deterministically from texts.

Settings that make code round-trip exactly (`decode(encode(text)) == text`):
  * identity normalization, `remove_extra_whitespaces=False`, `add_dummy_prefix=False`:
    spaces and indentation are kept as they are, and no space is invented at the start of a
    text, so pieces encoded separately (prompt, response) decode to their concatenation;
  * "\\n" is a user-defined symbol (one token); the trainer reads one line per sentence,
    so a newline is never learned from the data itself;
  * `byte_fallback=True`: any character not in the vocabulary (tabs, rare unicode) becomes
    its UTF-8 bytes.
Known exception: the character U+2581 ("▁") is sentencepiece's own space marker and decodes
as a space.

Determinism: the corpus is fed in its given order (a line cap keeps every k-th line, not
a shuffled sample), the random seed is fixed, and the model is serialized without input or
output paths, so two runs on the same texts give byte-identical `tokenizer.model` files in
any directory. A rerun with the same texts and settings reuses the model (`spm_train.json`
holds the input hash).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Iterable, Iterator

from xft_megatron.errors import UsageError

MODEL_FILE = "tokenizer.model"
META_FILE = "spm_train.json"  # not "tokenizer*.json": that would read as an HF directory
MODEL_TYPES = ("bpe", "unigram")
SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}
NEWLINE = "\n"
_FORMAT = 1  # bump when the training settings below change (invalidates cached models)


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int = 2048,
                        seed: int = 0, model_type: str = "bpe",
                        max_sentences: int = 2_000_000) -> str:
    """Train a sentencepiece model on `texts` into `out_dir/tokenizer.model`; returns its
    path. Lines are the training sentences; more than `max_sentences` lines are thinned
    to every k-th line. Reuses an existing model trained on the same texts and settings."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise UsageError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < 256 + len(SPECIAL_IDS) + 1:
        raise UsageError(f"vocab_size {vocab_size} is too small: byte fallback alone needs "
                         f"256 ids plus {len(SPECIAL_IDS)} special ids and the newline")
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, MODEL_FILE)
    settings = {"format": _FORMAT, "vocab_size": vocab_size, "seed": seed,
                "model_type": model_type, "max_sentences": max_sentences,
                "sentencepiece": spm.__version__}
    fd, corpus = tempfile.mkstemp(prefix=".spm-corpus-", suffix=".txt", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            digest, lines = _write_lines(texts, f, settings)
        if lines == 0:
            raise UsageError("no text to train a tokenizer on (every text was empty)")
        if _cached(out_dir, digest):
            return model_path
        spm.set_random_generator_seed(seed)
        writer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=_thinned(corpus, lines, max_sentences), model_writer=writer,
            vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            normalization_rule_name="identity", user_defined_symbols=[NEWLINE],
            input_sentence_size=max_sentences, shuffle_input_sentence=False,
            num_threads=2, minloglevel=2, **SPECIAL_IDS)
    finally:
        os.remove(corpus)
    model = writer.getvalue()
    _atomic_write(model_path, model)
    meta = dict(settings, input_sha256=digest, lines=lines,
                model_sha256=hashlib.sha256(model).hexdigest())
    _atomic_write(os.path.join(out_dir, META_FILE),
                  (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return model_path


def _write_lines(texts: Iterable[str], f, settings: dict):
    """Write the non-empty lines of `texts` to `f`; returns (sha256 of settings + texts,
    number of lines written)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    lines = 0
    for text in texts:
        h.update(len(text).to_bytes(8, "little"))
        h.update(text.encode("utf-8"))
        for line in text.split(NEWLINE):
            if line:
                f.write(line + NEWLINE)
                lines += 1
    return h.hexdigest(), lines


def _thinned(path: str, lines: int, cap: int) -> Iterator[str]:
    """The lines of `path` (newline removed): all, or every k-th when there are > `cap`."""
    step = -(-lines // cap)
    with open(path, encoding="utf-8", newline=NEWLINE) as f:
        for i, line in enumerate(f):
            if i % step == 0:
                yield line[:-1] if line.endswith(NEWLINE) else line


def _cached(out_dir: str, digest: str) -> bool:
    try:
        with open(os.path.join(out_dir, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        with open(os.path.join(out_dir, MODEL_FILE), "rb") as f:
            model_sha = hashlib.sha256(f.read()).hexdigest()
    except (OSError, ValueError):
        return False
    return meta.get("input_sha256") == digest and meta.get("model_sha256") == model_sha


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
