"""A HumanEval score must depend only on what the program under test cannot reach.

Each FORGERIES entry is a wrong completion that tries to be scored "passed" anyway: by writing
the runner's end mark to every inherited descriptor, from an atexit handler or the exception
hook after the asserts failed, by returning an object that equals everything, by patching the
builtins the test uses, by jumping over the test's asserts. All go through the scoring path
(`execute_completions`) and must come out "failed"; honest completions keep their scores.
"""

import pytest

from tests.unit.test_sandbox import _assert_cleaned_up, _processes_of
from xft_megatron.eval.humaneval import execute_completions, load_problems

PROBLEMS = {p["task_id"]: p for p in load_problems()}
P0, P2 = PROBLEMS["HumanEval/0"], PROBLEMS["HumanEval/2"]

# a completion body (raw protocol) for P0 that answers False to everything
WRONG = "    return False\n"

# writes "end" to every descriptor it inherited (the runner's end mark among them)
MARK_EVERY_FD = ("import os\n"
                 "for fd in range(3, 256):\n"
                 "    try:\n"
                 "        os.write(fd, b'end')\n"
                 "    except OSError:\n"
                 "        pass\n")


def _body(code: str) -> str:
    return "".join("    " + line + "\n" for line in code.splitlines())


FORGERIES = {
    # (a) the end mark on the inherited pipe, then exit 0
    "end mark then os._exit(0)": (P0, _body(MARK_EVERY_FD + "os._exit(0)")),
    # (b) the same from an atexit handler, after the check's assert failed
    "end mark from atexit": (P0, _body(
        "import atexit, os\n"
        "def forge():\n" + "".join("    " + l + "\n" for l in MARK_EVERY_FD.splitlines())
        + "    os._exit(0)\n"
        "atexit.register(forge)\n"
        "return False")),
    # (c) the failing assert caught by the exception hook, then the mark and os._exit(0)
    "os._exit(0) from the exception hook": (P0, _body(
        "import os, sys\n"
        "def forge(*exc):\n" + "".join("    " + l + "\n" for l in MARK_EVERY_FD.splitlines())
        + "    os._exit(0)\n"
        "sys.excepthook = forge\n"
        "return False")),
    "an object equal to everything": (P0, _body(
        "class Yes:\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    __hash__ = object.__hash__\n"
        "return Yes()")),
    "builtins.abs patched": (P2, _body(
        "import builtins\n"
        "builtins.abs = lambda x: 0\n"
        "return 0.5")),
    "the check's remaining asserts skipped (frame jump)": (P0, _body(
        "import sys\n"
        "caller = sys._getframe(1)\n"
        "last = max(line for _, _, line in caller.f_code.co_lines() if line is not None)\n"
        "if caller.f_lineno == last:\n"
        "    return False\n"
        "def jump(frame, event, arg):\n"
        "    if event == 'line' and frame.f_lineno < last:\n"
        "        frame.f_lineno = last\n"
        "    return jump\n"
        "caller.f_trace = jump\n"
        "sys.settrace(lambda *a: None)\n"
        "return True")),
}

# attempts the runner already scored "failed"; they must stay so
ATTEMPTS = {
    "raise SystemExit(0) inside the function": (P0, _body("raise SystemExit(0)")),
    "sys.exit(0) at the top level": (P0, WRONG + "import sys\nsys.exit(0)\n"),
    "'passed' and the end mark on stdout and stderr": (P0, _body(
        "import sys\n"
        "print('passed\\nend', flush=True)\n"
        "print('passed\\nend', file=sys.stderr, flush=True)\n"
        "return False")),
    "StopIteration raised by the function": (P0, _body("raise StopIteration")),
    "a return value of a type that cannot leave the process": (P0, _body(
        "return (x for x in [True])")),
    "signal every process it can see": (P0, _body(
        "import sys\n"
        "for m in [m for m in sys.modules if m == 'posix']:\n"
        "    del sys.modules[m]\n"
        "posix = __import__('posix')\n"
        "for pid in range(1, 4096):\n"
        "    try:\n"
        "        posix.kill(pid, 9)\n"
        "    except OSError:\n"
        "        pass\n"
        "return False")),
}


# Each of these runs in a fraction of a second; the wall-clock limit is only a backstop, and
# wide, because one run of the full suite on a loaded 2-core machine took over 10 s for one
# of them (the frame-jump forgery: scored "timeout" instead of "failed")
def _score(problem: dict, completion: str, protocol: str = "raw", timeout_s: float = 60.0):
    results = execute_completions([problem], {problem["task_id"]: [completion]},
                                  workers=1, timeout_s=timeout_s, protocol=protocol)
    return results[problem["task_id"]][0]


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_forged_pass_is_scored_failed(name):
    problem, completion = FORGERIES[name]
    r = _score(problem, completion)
    assert r.status == "failed", (name, r)


@pytest.mark.parametrize("name", sorted(ATTEMPTS))
def test_attempts_that_never_passed_stay_failed(name):
    problem, completion = ATTEMPTS[name]
    r = _score(problem, completion)
    assert r.status == "failed", (name, r)


def test_honest_completions_keep_their_scores():
    # 32 and 38: the tests call helpers the prompt defines (poly, encode_cyclic)
    for task_id in ("HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/38"):
        problem = PROBLEMS[task_id]
        right = _score(problem, problem["canonical_solution"])
        assert right.status == "passed", (task_id, right)
    fenced = "\n" + P0["canonical_solution"].rstrip() + "\n```\nExplanation: ..."
    assert _score(P0, fenced, "magicoder").status == "passed"
    wrong = _score(P0, WRONG)
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr_tail, wrong
    printing = _score(P0, _body("print('hello from the candidate')") + P0["canonical_solution"])
    assert printing.status == "passed" and "hello from the candidate" in printing.stdout_tail
    assert _score(P0, "    while True:\n        pass\n", timeout_s=1.5).status == "timeout"
    broken = _score(P0, "    return (\n")
    assert broken.status == "failed" and "SyntaxError" in broken.stderr_tail, broken


def test_values_cross_the_boundary_with_their_types():
    """Tuples stay tuples, ints stay ints, dict keys keep their types, exceptions their
    class: the test sees what the same function would return in its own process."""
    problem = {"task_id": "Types/0", "entry_point": "f",
               "prompt": "def f(kind):\n    \"\"\"Return a value of a kind.\"\"\"\n",
               "test": "def check(f):\n"
                       "    assert f('tuple') == (1, 'a', None) and type(f('tuple')) is tuple\n"
                       "    assert f('list') != (1, 2) and f('list') == [1, 2]\n"
                       "    assert type(f('int')) is int and type(f('float')) is float\n"
                       "    assert f('big') == 7 ** 9000\n"
                       "    assert f('dict') == {(1, 2): {3}, 'b': b'\\x00', 4.5: 1j}\n"
                       "    assert f('nan') != f('nan')\n"
                       "    assert f('bool') is True\n"
                       "    assert f('counter') == {'a': 2}\n"
                       "    try:\n"
                       "        f('raise')\n"
                       "    except ValueError as e:\n"
                       "        assert 'bad kind' in str(e)\n"
                       "    else:\n"
                       "        assert False\n"}
    body = _body("import collections\n"
                 "return {'tuple': lambda: (1, 'a', None), 'list': lambda: [1, 2],\n"
                 "        'int': lambda: 3, 'float': lambda: 3.0, 'big': lambda: 7 ** 9000,\n"
                 "        'dict': lambda: {(1, 2): {3}, 'b': b'\\x00', 4.5: 1j},\n"
                 "        'nan': lambda: float('nan'), 'bool': lambda: True,\n"
                 "        'counter': lambda: collections.Counter('aa'),\n"
                 "        }.get(kind, lambda: int('bad kind'))()")
    body = body.replace("int('bad kind')", "(_ for _ in ()).throw(ValueError('bad kind'))")
    r = _score(problem, body)
    assert r.status == "passed", r


def test_a_test_the_split_cannot_run_is_an_error_and_a_busy_program_a_timeout():
    from xft_megatron.sandbox.runner import SandboxLimits, run_tests
    code = "def f(x):\n    return x\n"
    passes_a_function = run_tests(code, "def check(f):\n    assert f(len) is len\n", "f")
    assert passes_a_function.status == "error", passes_a_function
    assert "only plain data" in passes_a_function.stderr_tail, passes_a_function
    no_check = run_tests(code, "def test(f):\n    pass\n", "f")
    assert no_check.status == "error" and "defines no check" in no_check.stderr_tail, no_check
    busy = run_tests("def f(x):\n    while True:\n        pass\n", "def check(f):\n    f(1)\n",
                     "f", timeout_s=30, limits=SandboxLimits(cpu_seconds=1))
    assert busy.status == "timeout" and busy.seconds < 15, busy  # RLIMIT_CPU, not 30 s
    missing = run_tests("def g(x):\n    return x\n", "def check(f):\n    f(1)\n", "f")
    assert missing.status == "failed" and "defines no function f" in missing.stderr_tail


def test_both_processes_and_directories_are_gone_afterwards():
    """The program prints its working directory to stdout, the test its own to stderr."""
    import os
    from xft_megatron.sandbox.runner import TESTS_HEADER, run_tests
    code = "import os\nprint(os.getcwd(), flush=True)\ndef f():\n    return 1\n"
    where = "    import os, sys\n    print(os.getcwd(), file=sys.stderr, flush=True)\n"
    for test in ("def check(f):\n" + where + "    assert f() == 1\n",
                 "def check(f):\n" + where + "    f()\n    while True:\n        pass\n"):
        # long enough for both processes to start on a loaded 2-core machine (at 2 s the
        # tester was once not ready in time, and nothing printed its directory)
        r = run_tests(code, test, "f", timeout_s=8)
        assert r.status in ("passed", "timeout"), r
        _assert_cleaned_up(r)
        tester_dir = r.stderr_tail.split(TESTS_HEADER, 1)[1].splitlines()[0]
        assert not os.path.exists(tester_dir) and _processes_of(tester_dir) == [], r
