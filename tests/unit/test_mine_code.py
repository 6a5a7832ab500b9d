"""Function-completion records mined from source trees, and the code tokenizer."""

import ast
import hashlib
import json
import os

import pytest
import sentencepiece

from xft_megatron.data import spm as spm_mod
from xft_megatron.data.code_corpus import stdlib_dir
from xft_megatron.data.mine_code import (LEAD, corpus_text, heldout_modules, mine_code_main,
                                         mine_functions, mine_tree, module_name, split_files,
                                         top_level)
from xft_megatron.data.spm import train_sentencepiece
from xft_megatron.data.tokenizer import load_tokenizer

SOURCE = '''import os


def add(a, b):
    """Add two numbers.

    Returns their sum.
    """
    # sum them
    total = a + b
    return total


def nodoc(x):
    y = x
    return y


def short(x):
    """One statement on one line."""
    return x


def stub(x):
    """Not yet."""
    raise NotImplementedError("later")


def dots():
    """Dots."""
    ...


def same_line(x):
    """Doc."""; y = x; return y


class Foo:
    """A class."""

    @property
    def value(self):
        """The value."""
        v = self._v
        return v

    async def fetch(self, url):
        """Fetch url."""
        async with session(url) as r:
            return await r.read()

    class Inner:
        def deep(self):
            """Deep."""
            a = 1
            return a


def outer(n):
    """Outer."""
    def inner(m):
        """Inner docstring."""
        k = m + 1
        return k
    return inner(n)


if os.name:
    def guarded(x):
        """Defined under an if."""
        y = x * 2
        return y
'''


def _fn(name, body="    y = x + 1\n    return y\n"):
    return f'def {name}(x):\n    """Function {name}."""\n{body}\n\n'


def _tree(root):
    """A small source tree: packages, top-level modules, bad files, duplicates."""
    files = {
        "mod.py": SOURCE,
        "pkg/__init__.py": _fn("pkg_init"),
        "pkg/a.py": _fn("pkg_a"),
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": _fn("pkg_sub_b"),
        "broken.py": "def f(:\n    pass\n",
        "dup1.py": _fn("twin"),
        "dup2.py": _fn("twin"),                      # identical file: read once
        "copy_a.py": "X = 1\n\n" + _fn("shared"),
        "copy_b.py": "Y = 2\n\n" + _fn("shared"),    # same function, another file
        "tests/test_skipped.py": _fn("in_tests"),
    }
    files.update({f"m{i:02d}.py": _fn(f"f{i:02d}", f"    y = x + {i}\n    return y\n")
                  for i in range(20)})
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "latin.py").write_bytes(b"def f(x):\n    '''Caf\xe9.'''\n    y = x\n    return y\n")
    return root


# ------------------------------------------------------------------------------ one file
def test_module_name(tmp_path):
    root = str(tmp_path)
    assert module_name(root, os.path.join(root, "a.py")) == "a"
    assert module_name(root, os.path.join(root, "pkg", "__init__.py")) == "pkg"
    assert module_name(root, os.path.join(root, "pkg", "sub", "b.py")) == "pkg.sub.b"
    assert top_level("pkg.sub.b") == "pkg"
    with pytest.raises(ValueError, match="not under the source root"):
        module_name(os.path.join(root, "x"), os.path.join(root, "y.py"))


def test_exact_records():
    records = mine_functions(SOURCE, "mod")
    assert [r["name"] for r in records] == [
        "add", "Foo.value", "Foo.fetch", "Foo.Inner.deep", "outer", "guarded"]
    add = records[0]
    assert add == {
        "instruction": LEAD + 'def add(a, b):\n    """Add two numbers.\n\n    Returns their '
                              'sum.\n    """\n',
        "response": "    # sum them\n    total = a + b\n    return total\n",
        "module": "mod", "name": "add", "lineno": 4}
    value = records[1]
    assert value["instruction"] == LEAD + '# method of class Foo\ndef value(self):\n' \
                                          '    """The value."""\n'
    assert value["response"] == "    v = self._v\n    return v\n"
    assert records[3]["instruction"].startswith(LEAD + "# method of class Foo.Inner\ndef deep")
    assert "def inner(m):" in records[4]["response"]  # nested function stays in the body
    assert records[5]["instruction"] == LEAD + 'def guarded(x):\n    """Defined under an if."""\n'
    for r in records:
        tree = ast.parse(r["instruction"][len(LEAD):] + r["response"])
        assert isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        assert tree.body[0].name == r["name"].split(".")[-1]


def test_line_endings_and_bad_source():
    crlf = mine_functions(SOURCE.replace("\n", "\r\n"), "mod")
    assert crlf == mine_functions(SOURCE, "mod")
    with pytest.raises(SyntaxError):
        mine_functions("def f(:\n", "bad")


def test_string_less_indented_than_def_is_left_out():
    src = 'class A:\n    def f(self):\n        """Doc."""\n        s = """\nflush\n"""\n' \
          '        return s\n'
    assert mine_functions(src, "a") == []


# ------------------------------------------------------------------------------ a tree
def test_mine_tree_counts_dedupe_and_split(tmp_path):
    root = _tree(tmp_path)
    train, held, stats = mine_tree(str(root), heldout_every=3)
    assert stats["files"] == 30  # 32 written: the duplicate file and tests/ are skipped
    assert stats["parse_failures"] == 1 and stats["decode_failures"] == 1
    names = [r["name"] for r in train + held]
    assert names.count("twin") == 1 and names.count("shared") == 1 and "in_tests" not in names
    assert stats["duplicates"] == 1
    assert stats["records_train"] == len(train) and stats["records_heldout"] == len(held)
    assert train and held
    # split by top-level module: pkg, pkg.a, pkg.sub.b all on one side, nothing leaks
    side = {}
    for label, records in (("train", train), ("held", held)):
        for r in records:
            assert side.setdefault(top_level(r["module"]), label) == label, r["module"]
    assert {r["module"] for r in train + held if top_level(r["module"]) == "pkg"} == \
        {"pkg", "pkg.a", "pkg.sub.b"}
    pairs = lambda rs: {(r["instruction"], r["response"]) for r in rs}  # noqa: E731
    assert not pairs(train) & pairs(held)
    assert not {r["response"] for r in train} & {r["response"] for r in held}
    assert stats["modules_train"] + stats["modules_heldout"] == 27  # 20 m*, pkg, mod, ...
    # deterministic
    assert mine_tree(str(root), heldout_every=3) == (train, held, stats)


def test_split_rule():
    for every in (2, 3, 1000):  # two names: one on each side, whatever the hashes
        assert len(heldout_modules(["a", "b"], heldout_every=every)) == 1
    names = [f"n{i}" for i in range(200)]
    held = heldout_modules(names, heldout_every=10)
    assert 5 <= len(held) <= 40 and held == heldout_modules(reversed(names), heldout_every=10)
    assert set(held) & set(heldout_modules(names + ["zz"], 10)) == set(held)  # stable
    assert heldout_modules(["only"], 10) in ([], ["only"])
    with pytest.raises(ValueError, match="heldout_every"):
        heldout_modules(names, heldout_every=1)


def test_corpus_text_is_train_side(tmp_path):
    root = _tree(tmp_path)
    train_files, held_files = split_files(str(root), heldout_every=3)
    texts = list(corpus_text(train_files))
    assert len(texts) == len(train_files) - ("latin.py" in {os.path.basename(f)
                                                            for f in train_files})
    held_names = {f"def {r['name']}(" for r in mine_tree(str(root), heldout_every=3)[1]}
    assert not any(name in t for t in texts for name in held_names)


def test_cli(tmp_path, capsys):
    root = _tree(tmp_path / "src")
    out, held = tmp_path / "o" / "train.jsonl", tmp_path / "o" / "held.jsonl"
    assert mine_code_main(["--src", str(root), "--out", str(out), "--heldout-out", str(held),
                           "--heldout-every", "3"]) == 0
    train_rows = [json.loads(line) for line in out.read_text().splitlines()]
    held_rows = [json.loads(line) for line in held.read_text().splitlines()]
    train, heldout, _ = mine_tree(str(root), heldout_every=3)
    assert train_rows == train and held_rows == heldout
    assert f"train {len(train)}" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path / "o") if f.startswith(".tmp")]
    assert mine_code_main(["--src", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_stdlib_sample():
    train, held, stats = mine_tree(stdlib_dir(), max_files=150)
    assert stats["files"] == 150 and stats["parse_failures"] == 0
    assert len(train) + len(held) >= 300 and train and held
    assert not {top_level(r["module"]) for r in train} & {top_level(r["module"]) for r in held}
    for r in train[::50] + held[::20]:
        ast.parse(r["instruction"][len(LEAD):] + r["response"])


# ------------------------------------------------------------------------------ tokenizer
SNIPPETS = [
    "def f(x):\n    return x + 1\n\n\n",
    "class A:\n\tdef g(self):\n\t\treturn 'tab'\n",
    "    leading spaces\n  and trailing   \n",
    "\n\nstarts with newlines",
    "x = 1234567890 + 0.5e-10\n",
    "s = 'café ünïcödé 中文 🎉'  # émoji\n",
    "a\r\nb\rc\x0cd\x00",
    " ",
    "",
]


def _sample_texts(limit=300_000):
    train_files, _ = split_files(stdlib_dir(), max_files=60)
    texts, size = [], 0
    for text in corpus_text(train_files):
        texts.append(text)
        size += len(text)
        if size >= limit:
            break
    return texts


@pytest.fixture(scope="module")
def texts():
    return _sample_texts()


@pytest.fixture(scope="module")
def model(texts, tmp_path_factory):
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm")), vocab_size=1000)


def test_tokenizer_round_trip(model, texts):
    tok = load_tokenizer(model)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (1000, 0, 1, 2)
    for s in SNIPPETS + texts[:3]:
        assert tok.decode(tok.encode(s)) == s, repr(s[:80])
    a, b = "def f(x):\n", "    return x\n"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b  # no invented spaces
    ids = tok.encode("x = 1\n    y = 2\n")
    newline = sentencepiece.SentencePieceProcessor(model_file=model).piece_to_id("\n")
    assert newline in ids and len(ids) < len("x = 1\n    y = 2\n")


def test_tokenizer_deterministic_and_cached(model, texts, tmp_path, monkeypatch):
    other = train_sentencepiece(texts, str(tmp_path / "again"), vocab_size=1000)
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert digest(other) == digest(model)

    def refuse(**kwargs):
        raise AssertionError("retrained although the inputs did not change")

    monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "train", refuse)
    assert train_sentencepiece(iter(texts), str(tmp_path / "again"), vocab_size=1000) == other
    with pytest.raises(AssertionError, match="retrained"):
        train_sentencepiece(texts[:-1], str(tmp_path / "again"), vocab_size=1000)


def test_tokenizer_line_cap_and_errors(texts, tmp_path):
    path = train_sentencepiece(texts[:5], str(tmp_path / "cap"), vocab_size=600,
                               max_sentences=500)
    meta = json.load(open(os.path.join(tmp_path, "cap", spm_mod.META_FILE)))
    assert meta["lines"] > 500
    tok = load_tokenizer(path)
    assert all(tok.decode(tok.encode(s)) == s for s in SNIPPETS)
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(texts, str(tmp_path / "x"), vocab_size=100)
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(texts, str(tmp_path / "x"), model_type="word")
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece(["", "\n\n"], str(tmp_path / "x"))
