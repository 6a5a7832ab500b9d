"""Examples -> token samples (ids, loss_mask), each at most seq_length + 1 tokens.

The loss mask is aligned with the ids: mask[t] = 1 means "token t is a training target"
(predicted from tokens < t of the same sample). The first token of a sample never is.
  * instruction / chat: one sample (templates.py, tokenizer.py); longer than seq_length + 1
    is the record error `too_long` (a cut would drop the end of the response);
  * text: [BOS] + text + EOS, all targets, cut into windows of seq_length + 1 tokens that
    overlap by one token, so every token after the first is a target exactly once;
  * tokens (`input_ids`): the ids exactly as given, all targets, windowed like text.
"""

from typing import List, Optional, Sequence

from xft_megatron.data.records import Chat, Example, Instruction, RecordError, Text, Tokens
from xft_megatron.data.templates import encode_instruction
from xft_megatron.data.tokenizer import ChatTemplateError, Encoded, Tokenizer


def example_samples(ex: Example, tok: Tokenizer, template: str, seq_length: int,
                    id_bound: Optional[int] = None) -> List[Encoded]:
    """The samples of one example; RecordError when it cannot become any."""
    if isinstance(ex, Instruction):
        return [_single(encode_instruction(tok, ex.instruction, ex.response, template),
                        seq_length)]
    if isinstance(ex, Chat):
        try:
            encoded = tok.encode_chat(ex.messages)
        except ChatTemplateError as e:
            raise RecordError("template_error", str(e)) from None
        return [_single(encoded, seq_length)]
    if isinstance(ex, Text):
        bos = [] if tok.bos_id is None else [tok.bos_id]
        return windows(bos + tok.encode(ex.text) + [tok.eos_id], seq_length)
    if isinstance(ex, Tokens):
        top, bound = max(ex.ids), id_bound or tok.vocab_size
        if top >= bound:
            raise RecordError("bad_token_id", f"'input_ids' holds id {top} >= the vocabulary "
                              f"size {bound}")
        return windows(list(ex.ids), seq_length)
    raise TypeError(f"not an example: {type(ex).__name__}")


def _single(encoded: Encoded, seq_length: int) -> Encoded:
    ids, mask = encoded
    if len(ids) > seq_length + 1:
        raise RecordError("too_long", f"{len(ids)} tokens > seq_length + 1 = {seq_length + 1}; "
                          "raise train.seq_length or shorten the record")
    mask = [0] + list(mask[1:])
    if not any(mask):
        raise RecordError("empty_response", "no response tokens after templating")
    return list(ids), mask


def windows(ids: Sequence[int], seq_length: int) -> List[Encoded]:
    """Windows of up to seq_length + 1 tokens, stride seq_length (one token overlap); each
    window's first token is context only (mask 0), the rest are targets."""
    out = []
    start = 0
    while True:
        piece = list(ids[start:start + seq_length + 1])
        out.append((piece, [0] + [1] * (len(piece) - 1)))
        start += seq_length
        if start + 1 >= len(ids):
            return out
