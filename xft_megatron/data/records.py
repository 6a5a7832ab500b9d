"""Reading training records, one at a time, with per-record error accounting.

Files: `.jsonl` / `.ndjson` (one JSON object per line; read as bytes, so a line that is not
UTF-8 or not JSON is an error of that line only; blank lines are skipped), `.json` (a top-level
list of objects; a `.json` file that does not start with `[` is read as JSON lines) and
`.parquet` (one record per row; null columns count as absent). Locations are `path:LINE`
(JSON lines, 1-based) or `path[INDEX]` (JSON list / Parquet, 0-based).

Record kinds (`to_example`; with format=auto detected per record, in this order):
  chat         `messages`: [{role: system|user|assistant, content: str}, ...]
  instruction  `instruction` + `response` | `instruction` + `output` | `problem` + `solution`
               (an optional string `input`, as in Alpaca, is appended to the instruction)
  tokens       `input_ids`: [int, ...] (kept exactly)
  text         `text`: str

Column mapping (`map_columns`, data.columns): {field: column} reads a record's `column` as
`field` before the kind is detected, e.g. {instruction: problem, response: solution}; a record
without the column is the error missing_fields.

A bad record raises RecordError(reason, detail); reasons are listed in REASONS. A file that
cannot be read as a whole (not JSON, not a list, corrupt Parquet) raises DataError, a missing
one FileNotFoundError.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from xft_megatron.errors import UserError


REASONS = {
    "too_large": "a .jsonl line longer than MAX_RECORD_BYTES (skipped without being read whole)",
    "not_utf8": "bytes that are not UTF-8 (or a lone surrogate escape)",
    "bad_json": "not valid JSON",
    "missing_fields": "no fields of a known record kind (or of data.format)",
    "wrong_type": "a field (or the record) has the wrong JSON type or value",
    "empty_response": "instruction/chat record without response text",
    "empty_text": "text/input_ids record without content",
    "bad_token_id": "input_ids outside [0, vocab_size)",
    "template_error": "the chat template could not render the conversation",
    "too_long": "instruction/chat sample longer than seq_length + 1 tokens",
}
INSTRUCTION_FIELDS = (("instruction", "response"), ("instruction", "output"),
                      ("problem", "solution"))
ROLES = ("system", "user", "assistant")


class DataError(UserError, ValueError):
    """Training data is unusable as given; the message says what and where."""


class RecordError(Exception):
    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown record error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------ examples
@dataclass(frozen=True)
class Instruction:
    instruction: str
    response: str


@dataclass(frozen=True)
class Chat:
    messages: Tuple[Dict[str, str], ...]


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Tokens:
    ids: Tuple[int, ...]


Example = Union[Instruction, Chat, Text, Tokens]


def to_example(obj: Any, fmt: str = "auto") -> Example:
    """The example a parsed JSON value holds, for data.format `fmt`; RecordError if none."""
    if not isinstance(obj, dict):
        raise RecordError("wrong_type", f"record is {_json_type(obj)}, expected an object")
    kind = _detect(obj) if fmt == "auto" else fmt
    if kind is None:
        keys = ", ".join(k[:20] for k in sorted(map(str, obj))[:8]) or "none"
        raise RecordError("missing_fields", f"no known fields (has: {keys}); expected messages, "
                          "instruction+response/output, problem+solution, input_ids or text")
    return _PARSERS[kind](obj)


def map_columns(obj: Any, columns: Optional[Dict[str, str]]) -> Any:
    """`obj` with each mapped column renamed to its field (data.columns: {field: column})."""
    if not columns or not isinstance(obj, dict):
        return obj
    missing = [f"'{c}' (data.columns.{f})" for f, c in columns.items() if c not in obj]
    if missing:
        keys = ", ".join(k[:20] for k in sorted(map(str, obj))[:8]) or "none"
        raise RecordError("missing_fields", f"no column {', '.join(missing)} (has: {keys})")
    sources = set(columns.values())
    out = {k: v for k, v in obj.items() if k not in sources}
    out.update({f: obj[c] for f, c in columns.items()})
    return out


def _detect(obj: Dict[str, Any]) -> Optional[str]:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "problem" in obj:
        return "instruction"
    if "input_ids" in obj:
        return "tokens"
    if "text" in obj:
        return "text"
    return None


def _instruction(obj: Dict[str, Any]) -> Instruction:
    for prompt_key, answer_key in INSTRUCTION_FIELDS:
        if prompt_key in obj and answer_key in obj:
            prompt, answer = _string(obj, prompt_key), _string(obj, answer_key)
            extra = obj.get("input")
            if extra is not None:
                extra = _string(obj, "input")
                prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
            if not answer.strip():
                raise RecordError("empty_response", f"'{answer_key}' is empty")
            return Instruction(prompt, answer)
    raise RecordError("missing_fields", "an instruction record needs instruction+response, "
                      "instruction+output or problem+solution")


def _chat(obj: Dict[str, Any]) -> Chat:
    if "messages" not in obj:
        raise RecordError("missing_fields", "a chat record needs 'messages'")
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise RecordError("wrong_type", f"'messages' is {_json_type(msgs)}, expected a list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError("wrong_type", f"messages[{i}] is {_json_type(m)}, expected an "
                              "object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise RecordError("missing_fields", f"messages[{i}] has no '{key}'")
        role, content = _string(m, "role", f"messages[{i}]."), \
            _string(m, "content", f"messages[{i}].")
        if role not in ROLES:
            raise RecordError("wrong_type", f"messages[{i}].role={role[:20]!r} is not one of "
                              f"{', '.join(ROLES)}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise RecordError("empty_response", "no assistant message with content")
    return Chat(tuple(out))


def _text(obj: Dict[str, Any]) -> Text:
    if "text" not in obj:
        raise RecordError("missing_fields", "a text record needs 'text'")
    text = _string(obj, "text")
    if not text.strip():
        raise RecordError("empty_text", "'text' is empty")
    return Text(text)


def _tokens(obj: Dict[str, Any]) -> Tokens:
    if "input_ids" not in obj:
        raise RecordError("missing_fields", "a tokens record needs 'input_ids'")
    ids = obj["input_ids"]
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise RecordError("wrong_type", "'input_ids' must be a list of integers")
    if not ids:
        raise RecordError("empty_text", "'input_ids' is empty")
    low = min(ids)
    if low < 0:
        raise RecordError("bad_token_id", f"'input_ids' holds the negative id {low}")
    return Tokens(tuple(ids))


_PARSERS = {"instruction": _instruction, "chat": _chat, "text": _text, "tokens": _tokens}


def _string(obj: Dict[str, Any], key: str, where: str = "") -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"'{where}{key}' is {_json_type(value)}, expected a "
                          "string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError("not_utf8", f"'{where}{key}' holds a lone surrogate escape") from None
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------ files
Record = Tuple[str, Any]  # (location, parsed value or RecordError)


def read_records(path: str) -> Iterator[Record]:
    """(location, value) for every record of `path`; value is a RecordError when the record
    itself could not be read (not UTF-8, not JSON)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file '{path}' does not exist (data.path takes "
                                "comma-separated .jsonl/.json/.parquet files or builtin:stdlib)")
    kind = file_kind(path)
    if kind == "parquet":
        return _parquet_records(path)
    if kind == "json":
        return _json_list_records(path)
    return _jsonl_records(path)


def file_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".json"):
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json" if head.startswith(b"[") else "jsonl"
    raise DataError(f"data file '{path}': unknown type; expected .jsonl, .ndjson, .json "
                    "or .parquet")


# the longest .jsonl line read as a record: parsing a line takes many times its size in memory
# (a 200 MB line needed 5.9 GB), so a longer one is skipped in bounded pieces, never held whole
MAX_RECORD_BYTES = 64 * 1024 * 1024


def _jsonl_records(path: str) -> Iterator[Record]:
    limit = MAX_RECORD_BYTES
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(limit + 1)  # at most the limit and its newline
            if not raw:
                return
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw) + _skip_line(f)
                yield f"{path}:{lineno}", RecordError(
                    "too_large", f"line of {size:,} bytes, over the {limit:,}-byte limit for "
                    "one record (split it, or shorten what it holds)")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            yield f"{path}:{lineno}", parse_line(raw)


def _skip_line(f) -> int:
    """Read past the rest of the current line in 1 MiB pieces; the bytes skipped."""
    skipped = 0
    while True:
        piece = f.readline(1 << 20)
        skipped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return skipped


def parse_line(raw: bytes) -> Any:
    """A JSON value from one line of bytes, or the RecordError saying why there is none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RecordError("bad_json", f"{e.msg} (column {e.colno})")
    except (ValueError, RecursionError) as e:  # e.g. nesting too deep, huge integer literal
        return RecordError("bad_json", str(e)[:80] or type(e).__name__)


def _json_list_records(path: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{path}' is not UTF-8 (byte offset {e.start}); a .json "
                        "file is read as a whole, so fix it or convert it to .jsonl") from None
    except json.JSONDecodeError as e:
        raise DataError(f"data file '{path}' is not valid JSON at line {e.lineno} column "
                        f"{e.colno}: {e.msg}; a .json file is read as a whole, so fix it or "
                        "convert it to .jsonl (one record per line)") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"data file '{path}' is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"data file '{path}' holds {_json_type(data)}; a .json data file must "
                        "hold a list of records")
    for i, value in enumerate(data):
        yield f"{path}[{i}]", value


def _parquet_records(path: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data file '{path}' is not a readable Parquet file: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for value in batch.to_pylist():  # columns a row does not use read as null
            yield f"{path}[{row}]", {k: v for k, v in value.items() if v is not None}
            row += 1


# ------------------------------------------------------------------------------ report
@dataclass
class DataReport:
    """What happened to the records: counts per error reason and the first few examples."""

    read: int = 0  # records read
    kept: int = 0  # records that became samples
    samples: int = 0  # samples (a long text record gives several)
    tokens: int = 0
    # loss (target) tokens: mask 1 past each sample's first token; None in a cache written
    # before they were counted
    targets: Optional[int] = 0
    errors: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[str]] = field(default_factory=dict)
    max_examples: int = 3
    from_cache: bool = False

    def add_error(self, location: str, err: RecordError) -> None:
        self.errors[err.reason] = self.errors.get(err.reason, 0) + 1
        shown = self.examples.setdefault(err.reason, [])
        if len(shown) < self.max_examples:  # printable even with lone surrogates in it
            line = f"{location}: {err.reason}: {err.detail}"
            shown.append(line.encode("utf-8", "backslashreplace").decode("utf-8"))

    @property
    def dropped(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> str:
        src = " (from cache)" if self.from_cache else ""
        targets = "" if self.targets is None else f" ({self.targets} targets)"
        return (f"{self.read} records read, {self.kept} kept, {self.dropped} dropped -> "
                f"{self.samples} samples, {self.tokens} tokens{targets}{src}")

    def table(self) -> str:
        """A short printable table: the summary line, then one row per error reason."""
        lines = [f"data: {self.summary()}"]
        if self.errors:
            lines.append(f"  {'reason':<16}{'count':>8}  first example")
        for reason in sorted(self.errors):
            first = self.examples.get(reason, [""])[0]
            lines.append(f"  {reason:<16}{self.errors[reason]:>8}  {first}")
        return "\n".join(lines)

    def failure_message(self, limit: int = 10) -> str:
        """Counts per reason and the first bad records, each as file:line: reason: detail."""
        counts = ", ".join(f"{r}={n}" for r, n in sorted(self.errors.items()))
        shown = [e for r in sorted(self.examples) for e in self.examples[r]][:limit]
        return f"{self.dropped} of {self.read} records are bad ({counts}):\n  " + \
            "\n  ".join(shown)

    def check(self, on_error: str) -> None:
        """Raise DataError for bad records under on_error=fail, or when nothing is left."""
        if self.errors and on_error == "fail":
            raise DataError(self.failure_message() + "\nfix them, or set data.on_error=skip "
                            "to drop them (the report lists what is dropped)")
        if self.samples == 0:
            why = f"; {self.failure_message()}" if self.errors else ""
            raise DataError(f"no usable samples: {self.read} records read{why}")

    def to_dict(self) -> Dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "samples": self.samples,
                "tokens": self.tokens, "targets": self.targets, "errors": self.errors,
                "examples": self.examples,
                "max_examples": self.max_examples}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], from_cache: bool = False) -> "DataReport":
        return cls(**{"targets": None, **d}, from_cache=from_cache)
