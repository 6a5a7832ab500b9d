"""`xft convert`: HF directory <-> Megatron distributed checkpoint (the model families of
`xft_megatron/arch/families/`; an XFT MoE checkpoint converts to HF as a remote-code model).

Both directions stream: tensors are read, transformed and written one decoder layer at a
time (`checkpoint/stream.py`, `checkpoint/hf.py`), so memory stays near one layer whatever
the model size. They run in one process on a CPU machine, or under torchrun where the layers
are spread over the ranks. The torch_dist checkpoint carries global tensor names and loads
under any parallel layout.
"""

import os
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from xft_megatron.arch import families
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.checkpoint import directory, stream
from xft_megatron.config import Config, PrecisionConfig
from xft_megatron.errors import HFFormatError, UsageError
from xft_megatron.hf import llama as hf_llama, moe as hf_moe
from xft_megatron.hf.files import (LazyTensors, check_tensors, model_config_from_hf, verify_weights,
                                   weights_index, write_hf_dir)
from xft_megatron.hf.remote import MODELING_FILE
from xft_megatron.hf.special_tokens import GENERATION_CONFIG, export_settings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_to_mcore(hf_dir: str, out: str, dtype: str = "fp32") -> str:
    """Convert an HF directory; returns the written checkpoint folder. Tokenizer files are
    copied along."""
    directory.require_empty_dir(out)  # never adds to (and repoints `latest` of) an existing run
    model_cfg, _ = model_config_from_hf(hf_dir)  # refuses unsupported configs up front
    tensors = LazyTensors(weights_index(hf_dir))
    check_tensors(tensors, hf_llama.hf_shapes(model_cfg), os.path.join(hf_dir, "config.json"))
    verify_weights(hf_dir)  # the shards' checksums, when this project wrote the directory
    cfg = Config(model=model_cfg, precision=PrecisionConfig(dtype=dtype))
    stream.initialize_single_rank_layout()
    layout = stream.layout_of(cfg)
    outer = hf_llama.outer_names(model_cfg)

    def group(g: Hashable) -> Dict[str, torch.Tensor]:
        if isinstance(g, int):
            return hf_llama.layer_from_hf(tensors, model_cfg, g)
        return {g: tensors[outer[g]]}

    # reading the HF shards (plain file reads) needs no collectives: the next layer is read
    # while this one is written
    cache = stream.GroupCache(group, prefetch=True)
    try:
        return ckpt.save_streamed(lambda folder: stream.write(folder, layout, cache), out, 0,
                                  cfg, extra_files=tokenizer_files(hf_dir))
    finally:
        cache.close()


def tokenizer_files(directory: str) -> Dict[str, str]:
    """Tokenizer files and the generation config in an HF directory or checkpoint folder
    (name -> path): what every checkpoint carries along from its source."""
    extra = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "chat_template.json", GENERATION_CONFIG)
    files = {f: os.path.join(directory, f) for f in sorted(os.listdir(directory))
             if f.startswith("tokenizer") or f in extra}
    roots = _link_roots(directory)
    for name, path in files.items():
        real = os.path.realpath(path)
        if not any(real.startswith(root + os.sep) for root in roots):
            raise HFFormatError(
                f"{path} is a link to '{real}', outside the model folder; the files copied "
                "into checkpoints and exports come from the model folder only. Replace the "
                "link with a copy of the file (cp --remove-destination TARGET LINK) if it "
                "belongs to the model")
        if not os.path.isfile(real):
            raise HFFormatError(f"{path} is not a regular file; a tokenizer file must be one")
    return files


def _link_roots(directory: str) -> List[str]:
    """Where a model folder's files may lead: the folder itself, and for a Hugging Face
    cache snapshot (.../models--ORG--NAME/snapshots/REV, whose files link to ../../blobs)
    that repository's blobs."""
    folder = os.path.realpath(directory)
    roots = [folder]
    parent = os.path.dirname(folder)
    if os.path.basename(parent) == "snapshots" and \
            os.path.basename(os.path.dirname(parent)).startswith(("models--", "datasets--")):
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def hf_dtype(cfg: Config, dtype: Optional[str]) -> str:
    """The dtype an HF export is written in: `dtype` if given, else the checkpoint's own
    (precision.dtype, what its tensors are stored in), so no export rounds silently."""
    if dtype is None:
        return cfg.precision.dtype
    if dtype not in DTYPES:
        raise UsageError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    return dtype


def mcore_to_hf(ckpt_dir: str, out: str, dtype: Optional[str] = None,
                shard_bytes: int = 2 * 2 ** 30) -> None:
    """Write an HF directory from a Megatron checkpoint (any layout it was saved in),
    safetensors shards of at most `shard_bytes` (or one larger tensor), in `dtype` (default:
    the checkpoint's, `hf_dtype`), with its tokenizer and special-token ids (config.json and
    generation_config.json, `checkpoint/special_tokens.py`). A dense checkpoint
    becomes the HF model of its family (`model.family`); an XFT MoE checkpoint the MoE of
    `hf_remote/modeling_xft_moe.py`, copied along (loads with `trust_remote_code=True`)."""
    directory.require_empty_dir(out)
    cfg = ckpt.load_config(ckpt_dir, parallel={})
    dtype = hf_dtype(cfg, dtype)
    folder = ckpt.resolve(ckpt_dir)
    moe = cfg.moe
    if cfg.stage == "merge":
        raise UsageError(f"'{ckpt_dir}' is a merge-stage checkpoint (train.stage=merge); fold it "
                         "first (`xft merge --ckpt ... --coefficients learned --hf-out DIR`)")
    stream.initialize_single_rank_layout()
    layout = stream.layout_of(cfg)
    reader = stream.Reader(ckpt_dir, layout)
    names = layout.groups()
    to_megatron = {v: k for k, v in hf_llama.outer_names(cfg.model).items()}

    def group(g: Hashable) -> Dict[str, torch.Tensor]:
        if isinstance(g, int):
            return hf_moe.moe_layer_to_hf(reader.read(names[g]), cfg.model, moe, g)
        return {g: reader.read_one(to_megatron[g])}

    if moe.enabled:
        shapes = hf_moe.moe_hf_shapes(cfg.model, moe)
        config = hf_moe.moe_hf_config_dict(cfg.model, moe)
        extra = {os.path.basename(MODELING_FILE): MODELING_FILE}
    else:
        shapes, config, extra = hf_llama.hf_shapes(cfg.model), \
            families.of(cfg.model).hf_config(cfg.model), {}
    files, generated = hf_tokenizer_files(folder)
    ids, generated[GENERATION_CONFIG] = export_settings(folder)
    config.update(ids)
    write_hf_dir(shapes, stream.GroupCache(group), config, out, DTYPES[dtype], shard_bytes,
                 extra_files={**extra, **files}, json_files=generated,
                 before_commit=reader.verified)


def hf_tokenizer_files(src: str) -> Tuple[Dict[str, str], Dict[str, Dict]]:
    """(files to copy, JSON files to write): the tokenizer stored with a checkpoint, for an HF
    directory. A bare sentencepiece model (the quickstart's) gets a tokenizer_config.json so
    that `AutoTokenizer` loads it (as LlamaTokenizer: BOS added, no text normalization)."""
    files = {k: v for k, v in tokenizer_files(src).items() if k != GENERATION_CONFIG}
    generated = {}
    if "tokenizer.model" in files and "tokenizer_config.json" not in files \
            and "tokenizer.json" not in files:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=files["tokenizer.model"])
        piece = lambda i: sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None  # noqa
        generated["tokenizer_config.json"] = {
            "tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()),
            "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
            "pad_token": piece(sp.pad_id()), "add_bos_token": sp.bos_id() >= 0,
            "add_eos_token": False, "legacy": False, "add_prefix_space": False}
    return files, generated
