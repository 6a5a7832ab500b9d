"""HumanEval prompting protocols: what the model is shown, where generation stops, and which
program is executed.

  raw        the problem's prompt (signature + docstring) is completed as code; the completion
             is cut at the usual stop sequences (a new top-level statement) and appended to
             the prompt. For base (pretrained-only) models.
  magicoder  the paper's protocol (Magicoder's text2code evaluation, used by XFT): the
             training template around the instruction
                 Write a solution to the following problem:
                 ```python
                 <prompt>
                 ```
             then the response prefix "```python\\n<prompt>", so the model continues the
             function inside a code block; the executed code is that block (prompt +
             generation up to the closing fence). For instruction-tuned models.
  chat       as magicoder, with the tokenizer's chat template around the instruction (one
             user turn, generation prompt) in place of the Magicoder template.
Generation also stops at the tokenizer's EOS (the export's generation config carries it).
"""

from typing import Callable, Optional, Sequence, Tuple

from xft_megatron.data.templates import render_prompt
from xft_megatron.errors import UsageError

PROTOCOLS = ("raw", "magicoder", "chat")
RAW_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
FENCE = "```"
BLOCK_STOPS = ("\n" + FENCE,)

# render(messages, add_generation_prompt) -> text, e.g. a tokenizer's apply_chat_template
ChatRenderer = Callable[[list, bool], str]


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise UsageError(f"prompt protocol {protocol!r} is not one of {', '.join(PROTOCOLS)} "
                         "(raw: code completion for base models; magicoder: the paper's "
                         "protocol for instruction-tuned models; chat: the tokenizer's chat "
                         "template)")


def instruction(problem: dict) -> str:
    """The instruction of the magicoder and chat protocols."""
    return f"Write a solution to the following problem:\n{FENCE}python\n" \
           f"{problem['prompt'].strip()}\n{FENCE}"


def response_prefix(problem: dict) -> str:
    """What the answer starts with under magicoder/chat: an open code block and the prompt."""
    return f"{FENCE}python\n{problem['prompt'].strip()}"


def build_prompt(protocol: str, problem: dict, chat: Optional[ChatRenderer] = None) -> str:
    """The text the model continues."""
    check_protocol(protocol)
    if protocol == "raw":
        return problem["prompt"]
    if protocol == "magicoder":
        return render_prompt("magicoder", instruction(problem)) + response_prefix(problem)
    if chat is None:
        raise UsageError("the chat protocol needs a tokenizer with a chat template; use "
                         "--prompt magicoder for a tokenizer without one")
    messages = [{"role": "user", "content": instruction(problem)}]
    return chat(messages, True) + response_prefix(problem)


def stop_strings(protocol: str) -> Tuple[str, ...]:
    check_protocol(protocol)
    return RAW_STOPS if protocol == "raw" else BLOCK_STOPS


def cut(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of `stops`."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]


def extract_code(protocol: str, problem: dict, generation: str) -> str:
    """The code the generation amounts to (tests not yet appended): raw -> prompt + the
    completion up to a stop sequence; magicoder/chat -> the code block the response prefix
    opened, up to its closing fence."""
    check_protocol(protocol)
    if protocol == "raw":
        return problem["prompt"] + cut(generation, RAW_STOPS)
    block = cut(generation, BLOCK_STOPS)
    if block.endswith(FENCE):  # a fence directly after the prefix, without a newline
        block = block[:-len(FENCE)]
    return (problem["prompt"].strip() + block).rstrip()
