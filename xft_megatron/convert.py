"""`xft convert`: HF directory <-> Megatron distributed checkpoint (dense Llama family).

torch_dist checkpoints carry global tensor names, so the checkpoint written here loads under
any parallel layout; the conversion itself runs in one process over full tensors.
"""

import json
import os
import shutil
from typing import Dict, Optional

import torch

from xft_megatron import parallel
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.checkpoint.hf import LazyTensors, check_tensors, model_config_from_hf, \
    weights_index, write_hf_dir
from xft_megatron.config import Config, PrecisionConfig
from xft_megatron.model.builder import build_model
from xft_megatron.transforms import hf_llama

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_full_state(chunks, tensors) -> None:
    """Copy (name, tensor) pairs (a mapping or a stream) into a single-rank model; every
    model tensor must receive a value. A stream is consumed one tensor at a time."""
    model = ckpt.unwrap(chunks[0])
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, value in (tensors.items() if hasattr(tensors, "items") else tensors):
            if name not in params:
                raise ValueError(f"conversion produced a tensor the model lacks: {name}")
            params[name].copy_(value)
            seen.add(name)
    missing = set(params) - seen
    if missing:
        raise ValueError(f"conversion produced no value for: {sorted(missing)[:5]}")


def hf_to_mcore(hf_dir: str, out: str, dtype: str = "fp32") -> str:
    """Convert an HF directory; returns the written checkpoint folder. Tokenizer files are
    copied along."""
    model_cfg, _ = model_config_from_hf(hf_dir)  # refuses unsupported configs up front
    tensors = LazyTensors(weights_index(hf_dir))
    check_tensors(tensors, hf_llama.hf_shapes(model_cfg), os.path.join(hf_dir, "config.json"))
    cfg = Config(model=model_cfg, precision=PrecisionConfig(dtype=dtype))
    parallel.initialize(cfg.parallel)
    chunks = build_model(cfg)
    load_full_state(chunks, hf_llama.from_hf(tensors, model_cfg))  # streamed
    return ckpt.save(chunks, out, 0, cfg, extra_files=tokenizer_files(hf_dir))


def tokenizer_files(directory: str) -> Dict[str, str]:
    """Tokenizer files in an HF directory or checkpoint folder (name -> path), to carry along."""
    extra = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "chat_template.json")
    return {f: os.path.join(directory, f) for f in os.listdir(directory)
            if f.startswith("tokenizer") or f in extra}


def mcore_to_hf(ckpt_dir: str, out: str, dtype: str = "bf16",
                architecture: Optional[str] = None) -> None:
    """Write a dense HF directory from a Megatron checkpoint (any layout it was saved in)."""
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"'{out}' exists and is not empty; choose a new --out")
    # the model is built in the checkpoint's own dtype (no fp32 copy of a bf16 model); the
    # requested output dtype is applied tensor by tensor while writing
    cfg = ckpt.load_config(ckpt_dir, parallel={})
    if cfg.moe.enabled:
        raise ValueError(f"'{ckpt_dir}' is an XFT MoE checkpoint (moe.num_experts="
                         f"{cfg.moe.num_experts}); only dense checkpoints convert to HF. Fold "
                         "the MoE back to a dense model first.")
    parallel.initialize(cfg.parallel)
    chunks = build_model(cfg)
    ckpt.load(chunks, ckpt_dir)
    sd = ckpt.gather_full_state_dict(chunks)
    arch = architecture or ("Qwen2ForCausalLM" if cfg.model.qkv_bias else "LlamaForCausalLM")
    write_hf_dir(hf_llama.to_hf(sd, cfg.model), cfg.model, arch, out, DTYPES[dtype])
    copy_tokenizer(ckpt.resolve(ckpt_dir), out)


def copy_tokenizer(src: str, out: str) -> None:
    """Copy the tokenizer files stored with a checkpoint into an HF directory. A bare
    sentencepiece model (the quickstart's) gets a tokenizer_config.json so that
    `AutoTokenizer` loads it (as LlamaTokenizer: BOS added, no text normalization)."""
    files = tokenizer_files(src)
    for name, path in files.items():
        shutil.copy2(path, os.path.join(out, name))
    if "tokenizer.model" in files and "tokenizer_config.json" not in files \
            and "tokenizer.json" not in files:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=files["tokenizer.model"])
        piece = lambda i: sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None  # noqa
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()),
                  "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
                  "pad_token": piece(sp.pad_id()), "add_bos_token": sp.bos_id() >= 0,
                  "add_eos_token": False, "legacy": False, "add_prefix_space": False}
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=1)
