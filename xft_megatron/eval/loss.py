"""`xft eval loss`: mean per-token loss and perplexity of a checkpoint on a dataset.

Records are read and tokenized exactly as for training (same formats and templates): loss on
response tokens for instruction/chat records, on every token after the first for `text` and
`input_ids` records. Samples are packed with per-sample attention isolation, so each is scored
as if alone. Dense, MoE and merge-stage checkpoints; any layout (torchrun).
"""

import math
import os
from typing import Dict, Optional

import torch

from xft_megatron import parallel
from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.config import ConfigError
from xft_megatron.data.dataset import build_dataset
from xft_megatron.data.packing import PackedBatches
from xft_megatron.data.tokenizer import load_tokenizer
from xft_megatron.model.builder import build_model
from xft_megatron.training.step import loss_totals, make_batch, split_global_batch


def evaluate_loss(checkpoint: str, data: str, tokenizer: Optional[str] = None,
                  layout: Optional[Dict] = None, seq_length: Optional[int] = None,
                  micro_batch_size: int = 4, template: str = "magicoder", fmt: str = "auto",
                  cache_dir: Optional[str] = None) -> Dict[str, float]:
    stored = ckpt.read_config(checkpoint)
    seq = seq_length or stored["train"]["seq_length"]
    dp_layout = dict(layout or {})
    cfg = ckpt.load_config(checkpoint, parallel=dp_layout,
                           train={**stored["train"], "seq_length": seq,
                                  "micro_batch_size": micro_batch_size,
                                  "global_batch_size": micro_batch_size},
                           data={"path": data, "tokenizer": tokenizer, "template": template,
                                 "format": fmt, "on_error": "fail"},
                           checkpoint={})
    info = parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    dp = cfg.parallel.data_parallel_size(info.world_size)
    tok_source = tokenizer
    if tok_source is None:
        folder = ckpt.resolve(checkpoint)
        tok_source = folder if any(f.startswith("tokenizer") for f in os.listdir(folder)) \
            else None
    tok = load_tokenizer(tok_source)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer ({tok_source or 'bytes'}) has {tok.vocab_size} ids "
                          f"but the model's vocabulary is {cfg.model.vocab_size}")
    cache = cache_dir or os.path.join(ckpt.resolve(checkpoint), "..", ".eval_cache")
    dataset, _ = build_dataset(cfg.data, tok, seq, cache, vocab_size=cfg.model.vocab_size)
    batches = PackedBatches(dataset, seq, micro_batch_size * dp, seed=0, packing=True,
                            pad_id=tok.pad_id)
    chunks = build_model(cfg)
    ckpt.load(chunks, checkpoint)
    for c in chunks:
        c.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for step in range(len(batches)):  # one epoch: every sample exactly once
            mbs = split_global_batch(make_batch(batches[step]), micro_batch_size)
            s, n = loss_totals(chunks, mbs, seq)
            total, count = total + s, count + n
    if count == 0:
        raise ValueError(f"'{data}' has no tokens to score (every loss mask is empty)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}
