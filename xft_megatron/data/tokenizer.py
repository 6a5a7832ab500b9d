"""Tokenizers behind one small interface: Hugging Face directories, sentencepiece models, bytes.

`load_tokenizer(path)`:
  * a directory with `tokenizer.json` or `tokenizer_config.json` -> Hugging Face
    (`AutoTokenizer.from_pretrained(path, local_files_only=True)`);
  * a `.model` file, or a directory holding only a sentencepiece `tokenizer.model`
    (e.g. a checkpoint folder) -> sentencepiece;
  * None -> bytes: ids 0..255 are the UTF-8 bytes, 256 is EOS (also used as padding),
    vocab_size 257, no BOS. Any model vocabulary of >= 257 entries covers it.

`encode` never adds special tokens; templates decide where BOS/EOS go.

Chat records (`encode_chat`) return (ids, loss_mask) with loss on assistant turns only:
  * with a Hugging Face chat template, the conversation is rendered prefix by prefix: for each
    assistant turn the text up to the generation prompt (mask 0) and the text the turn adds
    (mask 1, the template's end-of-turn marker included) are tokenized piece by piece, so the
    mask is exact and the ids are the concatenation of the pieces. A template whose rendering
    of a prefix is not a prefix of the longer rendering is refused (ChatTemplateError);
  * otherwise the plain chat template: [BOS] then per message `System: {content}\\n`,
    `User: {content}\\n` (mask 0), or `Assistant: ` (mask 0) + content + EOS (mask 1).
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from xft_megatron.errors import UsageError, UserError


Messages = Sequence[Dict[str, str]]
Encoded = Tuple[List[int], List[int]]  # (ids, loss_mask)

# files of a Hugging Face directory that define its tokenizer (hashed for cache keys)
_HF_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json",
                       "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")


def _is_tokenizer_file(name: str) -> bool:
    return name in _HF_TOKENIZER_FILES or name.startswith("tokenizer") or \
        name.endswith((".model", ".tiktoken"))


class ChatTemplateError(UserError, ValueError):
    """A conversation could not be rendered by the tokenizer's chat template."""


class Tokenizer:
    """The interface the data pipeline uses. Subclasses set the attributes and `encode`."""

    vocab_size: int
    eos_id: int
    bos_id: Optional[int]
    pad_id: int
    identity: str  # stable description (kind, path, vocab, file hash) for cache keys

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def encode_chat(self, messages: Messages) -> Encoded:
        """Token ids and loss mask (1 on assistant turns) of a conversation."""
        return plain_chat(self, messages)


def plain_chat(tok: Tokenizer, messages: Messages) -> Encoded:
    """The plain chat template (module docstring); used when there is no chat template."""
    ids: List[int] = [] if tok.bos_id is None else [tok.bos_id]
    mask: List[int] = [0] * len(ids)
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "assistant":
            head = tok.encode("Assistant: ")
            body = tok.encode(content) + [tok.eos_id]
            ids += head + body
            mask += [0] * len(head) + [1] * len(body)
        else:
            piece = tok.encode(f"{role.capitalize()}: {content}\n")
            ids += piece
            mask += [0] * len(piece)
    return ids, mask


def template_chat(render: Callable[[Messages, bool], str], encode: Callable[[str], List[int]],
                  messages: Messages) -> Encoded:
    """(ids, loss_mask) of `messages` from a chat-template renderer
    `render(messages, add_generation_prompt) -> str`, rendered prefix by prefix."""
    pieces: List[Tuple[str, int]] = []  # (text, mask)
    try:
        done = render(messages[:0], False)
    except ChatTemplateError:  # many templates refuse an empty conversation
        done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = render(messages[:i], True)
            pieces.append((_suffix(done, prompt, i), 0))
            done = prompt
        full = render(messages[:i + 1], False)
        pieces.append((_suffix(done, full, i), 1 if m["role"] == "assistant" else 0))
        done = full
    ids: List[int] = []
    mask: List[int] = []
    for text, trainable in pieces:
        piece = encode(text) if text else []
        ids += piece
        mask += [trainable] * len(piece)
    return ids, mask


def _suffix(prefix: str, text: str, index: int) -> str:
    if not text.startswith(prefix):
        raise ChatTemplateError(
            f"the chat template renders messages[:{index}] as text that is not a prefix of the "
            "longer conversation, so assistant tokens cannot be located; use data.template="
            "magicoder/plain or a tokenizer whose template renders prefixes stably")
    return text[len(prefix):]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255, EOS = pad = 256, vocab_size 257, no BOS."""

    vocab_size, eos_id, bos_id, pad_id = 257, 256, None, 256
    identity = "bytes:257"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = _optional_id(self._sp.eos_id())
        self.bos_id = _optional_id(self._sp.bos_id())
        pad = _optional_id(self._sp.pad_id())
        self.pad_id = pad if pad is not None else self.eos_id
        self.identity = f"sentencepiece:{os.path.abspath(model_file)}:{self.vocab_size}:" \
                        f"{files_digest([model_file])}"
        _require_eos(self, model_file)

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer(Tokenizer):
    def __init__(self, directory: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                  trust_remote_code=False)
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        pad = self._tok.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id
        files = [os.path.join(directory, f) for f in sorted(os.listdir(directory))
                 if _is_tokenizer_file(f)]
        self.identity = f"hf:{os.path.abspath(directory)}:{self.vocab_size}:{files_digest(files)}"
        _require_eos(self, directory)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode_chat(self, messages: Messages) -> Encoded:
        if not self.has_chat_template:
            return plain_chat(self, messages)
        return template_chat(self._render, self.encode, messages)

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        try:
            return self._tok.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises its own types (e.g. "roles must alternate")
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def _optional_id(i: int) -> Optional[int]:
    return i if i >= 0 else None


def _require_eos(tok: Tokenizer, path: str) -> None:
    if tok.eos_id is None:
        raise UsageError(f"tokenizer '{path}' defines no EOS token; samples end with EOS, so "
                         "use a tokenizer that has one")


def files_digest(paths: Sequence[str]) -> str:
    """sha256 (16 hex digits) over the names and contents of `paths`."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_tokenizer(path: Optional[str]) -> Tokenizer:
    """A tokenizer from an HF directory, a sentencepiece `.model` file, or None (bytes)."""
    if path is None:
        return ByteTokenizer()
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if names & {"tokenizer.json", "tokenizer_config.json"}:
            return HFTokenizer(path)
        if "tokenizer.model" in names:
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
        raise FileNotFoundError(
            f"tokenizer directory '{path}' holds neither tokenizer.json / tokenizer_config.json "
            "(Hugging Face) nor tokenizer.model (sentencepiece)")
    if os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        raise FileNotFoundError(f"tokenizer '{path}' is a file but not a sentencepiece .model; "
                                "expected an HF tokenizer directory or a .model file")
    raise FileNotFoundError(f"tokenizer '{path}' does not exist; expected an HF tokenizer "
                            "directory or a sentencepiece .model file (or no path: bytes)")


def tokenizer_for_model(path: Optional[str], checkpoint_dir: Optional[str],
                        model_vocab_size: int) -> Tuple["Tokenizer", Optional[str]]:
    """(tokenizer, its source): `path` if given, else the tokenizer files stored in
    `checkpoint_dir` (an iter_* folder), else bytes. Refused (ValueError naming both sizes)
    when the tokenizer's ids do not fit the model's vocabulary."""
    source = path
    if source is None and checkpoint_dir and \
            any(f.startswith("tokenizer") for f in os.listdir(checkpoint_dir)):
        source = checkpoint_dir
    tok = load_tokenizer(source)
    if tok.vocab_size > model_vocab_size:
        raise UsageError(f"the tokenizer ({source or 'bytes'}) has {tok.vocab_size} ids but the "
                         f"model's vocabulary is {model_vocab_size}: use the model's own "
                         "tokenizer or a model with a larger vocabulary")
    return tok, source
