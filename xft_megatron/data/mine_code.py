"""Instruction records mined from a Python source tree: "complete this function" tasks.

Every function or method that has a docstring and a non-trivial body becomes one record:

  instruction  LEAD + ["# method of class C\\n"] + the signature line(s) + the docstring
  response     the rest of the function body, as source lines (comments kept)

Text is cut from the source by `ast` line numbers and dedented by the indentation of the
`def` line, so `instruction[len(LEAD):] + response` is the function's own source (decorators
left out; line endings normalized to "\\n", as Python itself reads source). Functions whose
lines cannot be cut that way (a docstring sharing a line with code, a string literal less
indented than the `def`) are left out.

Train / held-out split is by top-level module name (`email.*` all on one side), decided by
a stable hash of the name, so a module's side never depends on which other files are mined.
Identical (instruction, response) pairs are kept once (the train copy if there is one, else
the first in sorted file order), and a held-out record whose response also is a train
response is dropped: nothing leaks.

Several source roots mine as one tree: files unique by content across roots, module names
relative to their own root, one split over all top-level names.

Only regular files of at most `max_bytes` are read (`code_corpus.read_regular`): a device or a
named pipe called `*.py` (or a symlink to one), a symlink leading out of its source root and an
oversized file are skipped, counted in the stats under `skipped_<reason>` and named by the CLI.

CLI: `xft data mine-code --src DIR|stdlib|site-packages [...] --out FILE.jsonl
[--heldout-out FILE.jsonl]`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import tokenize
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from xft_megatron.data.code_corpus import (MAX_SOURCE_BYTES, SKIP_REASONS, SkippedFile,
                                           python_files, read_regular, source_dirs)

LEAD = "Complete the following Python function.\n\n"
Record = Dict[str, object]
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


# ------------------------------------------------------------------------------ one file
def module_name(root: str, path: str) -> str:
    """Dotted module name of `path` relative to `root` (`pkg/__init__.py` -> `pkg`)."""
    rel = os.path.relpath(path, root)
    if rel.startswith(".."):
        raise ValueError(f"'{path}' is not under the source root '{root}'")
    parts = rel[:-3].split(os.sep) if rel.endswith(".py") else rel.split(os.sep)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def mine_functions(source: str, module: str) -> List[Record]:
    """Records of the documented, non-trivial functions and methods in `source`, by line.

    Functions nested inside functions are skipped. Raises SyntaxError (or ValueError for
    null bytes) when `source` does not parse."""
    lines = io.StringIO(source, newline=None).readlines()  # \r\n and \r read as \n
    tree = ast.parse("".join(lines))
    records = []
    for node, classes in _functions(tree, ()):
        record = _record(node, classes, lines, module)
        if record is not None:
            records.append(record)
    records.sort(key=lambda r: r["lineno"])
    return records


def _functions(node: ast.AST, classes: Tuple[str, ...]) -> Iterator[Tuple[ast.AST, Tuple]]:
    """(function node, enclosing class names) at module / class level, in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _FUNCTIONS):
            yield child, classes
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, classes + (child.name,))
        elif not isinstance(child, ast.expr):  # if / try / with blocks may hold defs
            yield from _functions(child, classes)


def _record(node, classes: Tuple[str, ...], lines: List[str], module: str) -> Optional[Record]:
    doc, rest = node.body[0], node.body[1:]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)):
        return None
    if not _substantial(rest):
        return None
    # whole lines only: signature | docstring | body, each starting on a line of its own
    if not (node.lineno < doc.lineno and doc.end_lineno < rest[0].lineno):
        return None
    indent = lines[node.lineno - 1][:node.col_offset]
    if indent.strip():  # `def` shares its line with other code
        return None
    head = _dedent(lines[node.lineno - 1:doc.end_lineno], indent)
    body = _dedent(lines[doc.end_lineno:node.end_lineno], indent)
    if head is None or body is None:
        return None
    owner = f"# method of class {'.'.join(classes)}\n" if classes else ""
    return {"instruction": LEAD + owner + head, "response": body, "module": module,
            "name": ".".join(classes + (node.name,)), "lineno": node.lineno}


def _substantial(body: Sequence[ast.stmt]) -> bool:
    """At least 2 statements, or 1 spanning >= 2 lines; not only pass / ... / raise NIE."""
    if not body or all(_placeholder(s) for s in body):
        return False
    return len(body) >= 2 or body[0].end_lineno > body[0].lineno


def _placeholder(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return stmt.value.value is Ellipsis
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _dedent(lines: Sequence[str], indent: str) -> Optional[str]:
    """`lines` without the `indent` prefix (blank lines emptied); None if a line lacks it."""
    out = []
    for line in lines:
        if line.startswith(indent):
            out.append(line[len(indent):])
        elif not line.strip():
            out.append("\n")
        else:
            return None
    text = "".join(out)
    return text if text.endswith("\n") else text + "\n"


def read_source(path: str, max_bytes: int = MAX_SOURCE_BYTES, root: Optional[str] = None
                ) -> str:
    """Text of a Python file in its declared encoding (PEP 263; UTF-8 by default).
    Raises UnicodeDecodeError / SyntaxError (bad cookie) when it cannot be decoded, and
    SkippedFile when it is not a regular file of at most `max_bytes` (`read_regular`)."""
    data = read_regular(path, max_bytes, root)
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return data.decode(encoding)


# ------------------------------------------------------------------------------ a tree
def top_level(module: str) -> str:
    return module.split(".", 1)[0]


def heldout_modules(names: Iterable[str], heldout_every: int = 10) -> List[str]:
    """The top-level names held out: those whose sha1 is 0 mod `heldout_every`. With >= 2
    names both sides are non-empty (the name of smallest / largest hash moves over)."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2 (one in N top-level modules is held "
                         f"out), got {heldout_every}")
    names = sorted(set(names))
    digest = {n: int(hashlib.sha1(n.encode()).hexdigest(), 16) for n in names}
    held = {n for n in names if digest[n] % heldout_every == 0}
    if len(names) >= 2 and not held:
        held = {min(names, key=digest.get)}
    if len(names) >= 2 and len(held) == len(names):
        held.discard(max(names, key=digest.get))
    return sorted(held)


Roots = Union[str, Sequence[str]]


def _files_by_root(src_dirs: Roots, max_files: Optional[int], skipped: Dict[str, List[str]],
                   max_bytes: int = MAX_SOURCE_BYTES) -> List[Tuple[str, str]]:
    """(root, file) pairs: `python_files` of each root in turn (at most `max_files` each),
    unique by content across all roots; files not read are added to `skipped`."""
    if max_bytes < 1:
        raise ValueError(f"the per-file limit must be >= 1 byte, got {max_bytes}")
    roots = [src_dirs] if isinstance(src_dirs, str) else list(src_dirs)
    seen: set = set()
    pairs = []
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"source directory '{root}' does not exist")
        pairs += [(root, f) for f in python_files(root, max_files, seen, skipped, max_bytes)]
    return pairs


def source_files(src_dirs: Roots, max_files: Optional[int]) -> List[str]:
    """The files `split_tree(src_dirs, max_files)` reads, in its order."""
    return [f for _, f in _files_by_root(src_dirs, max_files, {})]


class Split(NamedTuple):
    """Files of one source root or several, split by top-level module name (a name is on one
    side whichever root holds it): (root, file) pairs per side, top-level name per file,
    files not read ({SKIP_REASONS key: paths}) and the per-file byte limit."""
    train: List[Tuple[str, str]]
    heldout: List[Tuple[str, str]]
    tops: Dict[str, str]
    skipped: Dict[str, List[str]] = {}
    max_bytes: int = MAX_SOURCE_BYTES


def split_tree(src_dirs: Roots, heldout_every: int = 10, max_files: Optional[int] = None,
               max_bytes: int = MAX_SOURCE_BYTES) -> Split:
    """`python_files` of each root (at most `max_files` per root), split by module; only
    regular files of at most `max_bytes` are read (the others are in `Split.skipped`)."""
    skipped: Dict[str, List[str]] = {}
    pairs = _files_by_root(src_dirs, max_files, skipped, max_bytes)
    tops = {f: top_level(module_name(root, f)) for root, f in pairs}
    held = set(heldout_modules(tops.values(), heldout_every))
    return Split([p for p in pairs if tops[p[1]] not in held],
                 [p for p in pairs if tops[p[1]] in held], tops, skipped, max_bytes)


def split_files(src_dirs: Roots, heldout_every: int = 10, max_files: Optional[int] = None
                ) -> Tuple[List[str], List[str]]:
    """(train files, held-out files) of `split_tree`."""
    split = split_tree(src_dirs, heldout_every, max_files)
    return [f for _, f in split.train], [f for _, f in split.heldout]


def corpus_text(files: Iterable[str]) -> Iterator[str]:
    """Decoded texts of `files` (pass the train side of `split_files`); undecodable files,
    and files that are no longer regular files within the size limit, are skipped."""
    for path in files:
        try:
            yield read_source(path)
        except (UnicodeDecodeError, SyntaxError, LookupError, SkippedFile):
            continue


def mine_tree(src_dirs: Roots, heldout_every: int = 10, max_files: Optional[int] = None,
              max_bytes: int = MAX_SOURCE_BYTES
              ) -> Tuple[List[Record], List[Record], Dict[str, int]]:
    """(train records, held-out records, stats) mined from every file of one source root or
    several (at most `max_files` per root; regular files of at most `max_bytes` only)."""
    return mine_split(split_tree(src_dirs, heldout_every, max_files, max_bytes))


def mine_split(split: Split) -> Tuple[List[Record], List[Record], Dict[str, int]]:
    """`mine_tree` of files already split (`split_tree`)."""
    train_pairs, held_pairs, tops = split.train, split.heldout, split.tops
    stats = {"files": len(train_pairs) + len(held_pairs), "decode_failures": 0,
             "parse_failures": 0, "duplicates": 0, "heldout_leaks_dropped": 0}
    for reason in SKIP_REASONS:
        stats[f"skipped_{reason}"] = len(split.skipped.get(reason, ()))
    seen = set()
    sides = []
    for pairs in (train_pairs, held_pairs):
        records = []
        for root, path in pairs:
            for r in _mine_file(root, path, stats, split.max_bytes):
                key = (r["instruction"], r["response"])
                if key in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(key)
                records.append(r)
        sides.append(records)
    train, held = sides
    train_responses = {r["response"] for r in train}
    kept = [r for r in held if r["response"] not in train_responses]
    stats["heldout_leaks_dropped"] = len(held) - len(kept)
    stats.update(records_train=len(train), records_heldout=len(kept),
                 modules_train=len({tops[f] for _, f in train_pairs}),
                 modules_heldout=len({tops[f] for _, f in held_pairs}))
    return train, kept, stats


def _mine_file(root: str, path: str, stats: Dict[str, int],
               max_bytes: int = MAX_SOURCE_BYTES) -> List[Record]:
    try:
        source = read_source(path, max_bytes, root)
    except SkippedFile as e:  # replaced since it was listed
        stats[f"skipped_{e.reason}"] += 1
        return []
    except (UnicodeDecodeError, SyntaxError, LookupError):  # bad bytes or coding cookie
        stats["decode_failures"] += 1
        return []
    try:
        return mine_functions(source, module_name(root, path))
    except (SyntaxError, ValueError, RecursionError):
        stats["parse_failures"] += 1
        return []


def write_jsonl(path: str, records: Iterable[Record]) -> int:
    """Write `records` as JSON lines, atomically (temp file + os.replace); returns count."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--src", required=True, nargs="+",
                        help="Python source trees: directories, or stdlib / site-packages "
                        "(this interpreter's)")
    parser.add_argument("--out", required=True, help="train records (JSONL)")
    parser.add_argument("--heldout-out", default=None, help="held-out records (JSONL)")
    parser.add_argument("--heldout-every", type=int, default=10,
                        help="about one in N top-level modules is held out")
    parser.add_argument("--max-files", type=int, default=None,
                        help="mine only the first N files (sorted order) of each source")
    parser.add_argument("--max-file-bytes", type=int, default=MAX_SOURCE_BYTES,
                        help="skip (and report) source files larger than this many bytes "
                        f"(default {MAX_SOURCE_BYTES})")
    return parser


SHOWN_SKIPS = 5  # skipped files named per reason; the rest are counted


def skip_report(split: Split) -> List[str]:
    """Lines naming the files a mining run skipped, by reason (empty when none was)."""
    lines = []
    for reason, paths in sorted(split.skipped.items()):
        what, fix = SKIP_REASONS[reason]
        if reason == "too_large":
            what += f" of {split.max_bytes} bytes"
        lines.append(f"skipped {len(paths)} file(s), {what}; {fix}:")
        lines += [f"  {p}" for p in paths[:SHOWN_SKIPS]]
        if len(paths) > SHOWN_SKIPS:
            lines.append(f"  ... and {len(paths) - SHOWN_SKIPS} more")
    return lines


def run(args: argparse.Namespace) -> int:
    """`xft data mine-code` from parsed arguments; returns an exit status."""
    if args.max_files is not None and args.max_files < 1:
        print(f"error: --max-files must be >= 1, got {args.max_files}", file=sys.stderr)
        return 2
    if args.max_file_bytes < 1:
        print(f"error: --max-file-bytes must be >= 1, got {args.max_file_bytes}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        split = split_tree(source_dirs(args.src), args.heldout_every, args.max_files,
                           args.max_file_bytes)
        train, held, stats = mine_split(split)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in skip_report(split):
        print(line, file=sys.stderr)
    write_jsonl(args.out, train)
    if args.heldout_out:
        write_jsonl(args.heldout_out, held)
    skipped = sum(stats[f"skipped_{reason}"] for reason in SKIP_REASONS)
    print(f"files {stats['files']} (decode failures {stats['decode_failures']}, parse "
          f"failures {stats['parse_failures']}, skipped {skipped}) in "
          f"{time.perf_counter() - start:.1f} s")
    print(f"records: train {stats['records_train']} -> {args.out}, held-out "
          f"{stats['records_heldout']} -> {args.heldout_out or '(not written)'}")
    print(f"top-level modules: train {stats['modules_train']}, held-out "
          f"{stats['modules_heldout']}; duplicates dropped {stats['duplicates']}, held-out "
          f"records dropped as train look-alikes {stats['heldout_leaks_dropped']}")
    return 0


def mine_code_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="xft data mine-code", description="Mine function-completion records from a "
        "Python source tree (train / held-out split by top-level module)."))
    return run(parser.parse_args(argv))
