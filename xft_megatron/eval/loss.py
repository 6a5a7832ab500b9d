"""`xft eval loss`: mean per-token loss and perplexity of a checkpoint on a dataset.

Records are read and tokenized exactly as for training (same formats and templates): loss on
response tokens for instruction/chat records, on every token after the first for `text` and
`input_ids` records. Each sample is scored alone, one per row: samples go in order of length
into batches padded only to their longest sample (`length_batches`), so the work is that of
the samples themselves (plain causal attention, no packing mask, little padding). Records may
be as long as the model's context (`max_position_embeddings`) unless `seq_length` caps them.
Dense, MoE and merge-stage checkpoints; any layout (torchrun).
"""

import math
from typing import Dict, Iterable, Iterator, Optional

import numpy as np
import torch

from xft_megatron.checkpoint import dist as ckpt
from xft_megatron.config import Config
from xft_megatron.data.dataset import build_dataset
from xft_megatron.data.records import DataError
from xft_megatron.data.tokenizer import tokenizer_for_model
from xft_megatron.errors import UsageError
from xft_megatron.model.builder import build_model
from xft_megatron.runtime import parallel
from xft_megatron.training.step import loss_totals, make_batch, split_global_batch


def evaluate_loss(checkpoint: str, data: str, cache_dir: str, tokenizer: Optional[str] = None,
                  layout: Optional[Dict] = None, seq_length: Optional[int] = None,
                  micro_batch_size: int = 4, template: str = "magicoder",
                  fmt: str = "auto", on_error: str = "fail",
                  split: str = "train") -> Dict[str, float]:
    """{loss, perplexity, tokens, records}; `cache_dir` holds the tokenized data. Records that
    cannot be scored (see data.on_error) fail the evaluation, or are skipped and counted.
    `seq_length`: the longest sample scored (default: the model's context). `data` takes
    what data.path takes (files, hf:NAME, dataset folders); `split` the datasets' split."""
    stored = ckpt.read_config(checkpoint)
    seq = seq_length or (stored.get("model") or {}).get("max_position_embeddings") or \
        stored["train"]["seq_length"]
    dp_layout = dict(layout or {})
    cfg = ckpt.load_config(checkpoint, parallel=dp_layout,
                           train={**stored["train"], "seq_length": seq,
                                  "micro_batch_size": micro_batch_size,
                                  "global_batch_size": micro_batch_size},
                           data={"path": data, "split": split, "tokenizer": tokenizer,
                                 "template": template,
                                 "format": fmt, "on_error": on_error},
                           checkpoint={})
    info = parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    dp = cfg.parallel.data_parallel_size(info.world_size)
    tok, _ = tokenizer_for_model(tokenizer, ckpt.resolve(checkpoint), cfg.model.vocab_size)
    try:
        dataset, report = build_dataset(cfg.data, tok, seq, cache_dir,
                                        vocab_size=cfg.model.vocab_size)
    except DataError as e:  # its hints name config keys; this command takes flags
        raise DataError(_with_flags(str(e))) from None
    batches = length_batches(dataset, micro_batch_size * dp, cfg.parallel.tensor, tok.pad_id)
    total, count = checkpoint_loss(cfg, checkpoint, batches)
    if count == 0:
        raise UsageError(f"'{data}' has no tokens to score (every loss mask is empty)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count),
            "records": report.kept, "skipped_records": report.dropped}


def length_batches(dataset, rows: int, multiple: int, pad_id: int) -> Iterator[Dict]:
    """Global batches of `rows` rows, one sample per row, samples longest first; each batch
    [rows, w] is padded to its longest sample, w - 1 rounded up to `multiple` (sequence
    parallelism splits the sequence over the tensor-parallel ranks). Rows left over in the
    last batch are padding (no loss). Every sample's first token is never a target."""
    lengths = np.asarray(dataset.lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), rows):
        picks = order[start:start + rows]
        seq = -(-(int(lengths[picks].max()) - 1) // multiple) * multiple
        tokens = np.full((rows, seq + 1), pad_id, dtype=np.int64)
        mask = np.zeros((rows, seq + 1), dtype=np.float32)
        segments = np.zeros((rows, seq + 1), dtype=np.int64)
        for r, index in enumerate(picks):
            ids, m = dataset[int(index)]
            n = len(ids)
            tokens[r, :n], mask[r, 1:n], segments[r, :n] = ids, m[1:], 1
        yield {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask),
               "segment_ids": torch.from_numpy(segments)}


# the config keys a data error names -> this command's flags for them
_FLAGS = {"data.on_error=skip": "--on-error skip", "data.on_error": "--on-error",
          "train.seq_length": "--seq-length"}


def _with_flags(message: str) -> str:
    for key, flag in _FLAGS.items():
        message = message.replace(key, flag)
    return message


def checkpoint_loss(cfg: Config, checkpoint: str, global_batches: Iterable):
    """(sum of token losses, loss tokens) of a checkpoint over global batches (token tensors
    or packed batch dicts), forward only in eval mode, in the layout of `cfg.parallel`."""
    parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    chunks = build_model(cfg)
    ckpt.load(chunks, checkpoint)
    for c in chunks:
        c.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in global_batches:
            full = make_batch(batch)
            mbs = split_global_batch(full, cfg.train.micro_batch_size)
            s, n = loss_totals(chunks, mbs, full["tokens"].shape[1])  # this batch's length
            total, count = total + s, count + n
    return total, count


def mean_loss(cfg: Config, checkpoint: str, global_batches: Iterable) -> float:
    """Per-token loss of a checkpoint on fixed global batches."""
    total, count = checkpoint_loss(cfg, checkpoint, global_batches)
    return total / max(count, 1.0)
