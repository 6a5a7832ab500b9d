"""Special-token ids and generation settings that travel with a model, from HF in to HF out.

An HF directory's `generation_config.json` (where `eos_token_id` may list several ids, e.g. a
chat model's end-of-turn token) is carried into every checkpoint made from it (`hf-to-mcore`,
upcycle, training, merge copy it with the tokenizer files). On export, the HF directory gets
    bos/eos/pad_token_id = the carried generation config's, else the tokenizer's
in both config.json and generation_config.json, so `generate` stops where the original does.
A checkpoint with no tokenizer and no generation config (byte-level data) gets none.
"""

import json
import os
from typing import Dict, List, Optional, Tuple, Union

from xft_megatron.errors import UsageError

GENERATION_CONFIG = "generation_config.json"
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

TokenId = Union[int, List[int]]


def carried_generation_config(folder: str) -> Dict:
    """The generation config stored in `folder` (checkpoint or HF directory), or {}."""
    path = os.path.join(folder, GENERATION_CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); restore it from the source model or "
                         "delete it (the tokenizer's special tokens are used then)") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} holds a JSON {type(cfg).__name__}, not an object; restore it "
                         "or delete it")
    return cfg


def tokenizer_token_ids(folder: str) -> Dict[str, Optional[int]]:
    """bos/eos/pad ids of the tokenizer stored in `folder` (HF files or a sentencepiece model);
    all None when it holds no tokenizer. Pad falls back to EOS, as in training."""
    from xft_megatron.data.tokenizer import load_tokenizer

    names = set(os.listdir(folder))
    if not names & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
        return dict.fromkeys(TOKEN_KEYS)
    tok = load_tokenizer(folder)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def export_settings(folder: str) -> Tuple[Dict[str, TokenId], Dict]:
    """(ids for config.json, generation_config.json) of an export of the checkpoint in
    `folder` (module docstring): keys with no id are left out; the carried generation config
    is kept (greedy when it says nothing about sampling). The tokenizer is loaded only when the
    carried config lacks an id."""
    carried = carried_generation_config(folder)
    ids = {k: carried[k] for k in TOKEN_KEYS if carried.get(k) is not None}
    if len(ids) < len(TOKEN_KEYS):
        from_tokenizer = tokenizer_token_ids(folder)
        ids.update({k: v for k, v in from_tokenizer.items() if k not in ids and v is not None})
    generation = {k: v for k, v in carried.items() if k != "transformers_version"}
    generation.setdefault("do_sample", False)
    return ids, {**generation, **ids}

