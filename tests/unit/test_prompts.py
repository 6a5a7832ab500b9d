"""HumanEval prompting protocols (eval/prompts.py) on fixed strings, and the programs they
execute, run in the sandbox."""

import gzip
import json

import pytest

from xft_megatron.eval import prompts
from xft_megatron.eval.humaneval import build_program, load_problems
from xft_megatron.sandbox.runner import run_program

P0 = load_problems(limit=1)[0]
MAGICODER_HEAD = ("You are an exceptionally intelligent coding assistant that consistently "
                  "delivers accurate and reliable responses to user instructions.\n\n"
                  "@@ Instruction\n")


def test_magicoder_prompt_is_the_papers_text():
    body = P0["prompt"].strip()
    assert prompts.build_prompt("magicoder", P0) == (
        MAGICODER_HEAD + "Write a solution to the following problem:\n```python\n" + body +
        "\n```\n\n@@ Response\n```python\n" + body)
    assert prompts.build_prompt("raw", P0) == P0["prompt"]


def test_chat_prompt_wraps_the_instruction_in_the_template():
    seen = []

    def render(messages, generation_prompt):
        seen.append((messages, generation_prompt))
        return "<user>" + messages[0]["content"] + "</user><assistant>"

    text = prompts.build_prompt("chat", P0, render)
    assert seen == [([{"role": "user", "content": prompts.instruction(P0)}], True)]
    assert text == "<user>" + prompts.instruction(P0) + "</user><assistant>```python\n" + \
        P0["prompt"].strip()
    with pytest.raises(ValueError, match="chat template"):
        prompts.build_prompt("chat", P0)


def test_code_extraction_per_protocol():
    head = P0["prompt"].strip()
    body = "\n    return False\n"
    for gen in (body + "```\nThis function returns False.", body + "```", body):
        assert prompts.extract_code("magicoder", P0, gen) == head + body.rstrip("\n")
        assert prompts.extract_code("chat", P0, gen) == head + body.rstrip("\n")
    assert prompts.extract_code("magicoder", P0, "```") == head
    assert prompts.extract_code("raw", P0, "    return 1\n\ndef other():\n") == \
        P0["prompt"] + "    return 1\n"
    assert prompts.stop_strings("magicoder") == ("\n```",)
    with pytest.raises(ValueError, match="raw, magicoder, chat"):
        prompts.build_prompt("fim", P0)


def test_extracted_programs_pass_and_fail_in_the_sandbox():
    right = "\n" + P0["canonical_solution"].rstrip() + "\n```\nExplanation: ..."
    assert run_program(build_program(P0, right, "magicoder")).status == "passed"
    assert run_program(build_program(P0, "\n    return False\n```", "chat")).status == "failed"
    # the explanation after the fence never reaches the interpreter
    assert "Explanation" not in build_program(P0, right, "magicoder")
    assert run_program(build_program(P0, P0["canonical_solution"], "raw")).status == "passed"


def test_problems_file_of_another_benchmark(tmp_path):
    task = {"task_id": "Mine/0", "prompt": "def two():\n    \"\"\"Return 2.\"\"\"\n",
            "test": "def check(f):\n    assert f() == 2\n", "entry_point": "two"}
    path = tmp_path / "mine.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(task) + "\n")
    (problem,) = load_problems(path=str(path))
    assert problem == task
    assert run_program(build_program(problem, "\n    return 2\n```", "magicoder")).status == \
        "passed"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="lacks test, entry_point"):
        load_problems(path=str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(path=str(tmp_path / "none.jsonl"))
