"""Prompt templates for instruction data and the response-only loss mask.

An (instruction, response) pair becomes
    [BOS] + prompt tokens (mask 0) + response tokens + EOS (mask 1)
with the prompt from one of the templates below (BOS only if the tokenizer has one).
Template `chat` renders [user: instruction, assistant: response] with the tokenizer's chat
template instead (or its plain fallback, see tokenizer.py), loss on the assistant turn.
"""

from typing import Dict

from xft_megatron.data.tokenizer import Encoded, Tokenizer
from xft_megatron.errors import UsageError

MAGICODER = ("You are an exceptionally intelligent coding assistant that consistently delivers "
             "accurate and reliable responses to user instructions.\n\n"
             "@@ Instruction\n{instruction}\n\n@@ Response\n")
PLAIN = "{instruction}\n"

PROMPTS: Dict[str, str] = {"magicoder": MAGICODER, "plain": PLAIN}
TEMPLATES = ("magicoder", "plain", "chat")


def render_prompt(template: str, instruction: str) -> str:
    if template not in PROMPTS:
        raise UsageError(f"no prompt text for template {template!r}; one of "
                         f"{', '.join(PROMPTS)} (template 'chat' uses the tokenizer's)")
    return PROMPTS[template].format(instruction=instruction)


def encode_instruction(tok: Tokenizer, instruction: str, response: str,
                       template: str) -> Encoded:
    """(ids, loss_mask) of one instruction/response pair; mask 1 on response tokens and EOS."""
    if template not in TEMPLATES:
        raise UsageError(f"template={template!r} must be one of {', '.join(TEMPLATES)}")
    if template == "chat":
        return tok.encode_chat([{"role": "user", "content": instruction},
                                {"role": "assistant", "content": response}])
    prompt = ([] if tok.bos_id is None else [tok.bos_id]) + \
        tok.encode(render_prompt(template, instruction))
    answer = tok.encode(response) + [tok.eos_id]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)
