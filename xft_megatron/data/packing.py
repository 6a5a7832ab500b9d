"""Sequence packing: samples -> rows of seq_length + 1 tokens -> global batches.

Rows. With packing, samples are placed greedily first-fit, in an order shuffled by `seed`,
into rows of seq_length + 1 tokens; without it, one sample per row. The rows are fixed for a
(dataset, seed): the number of global batches per epoch is then a constant, so step `i` maps
to epoch `i // len` and batch `i % len` with no other state, and resuming needs only the step
number. Each epoch visits all rows in its own order (seeded by seed and epoch); the last
global batch of an epoch is filled up with empty (all padding) rows, so every sample appears
exactly once per epoch.

Batches (`PackedBatches[step]`), all [B, seq_length + 1]:
  tokens       int64, padding = pad_id
  loss_mask    float32, aligned with tokens: 1 where the token is a target of its own sample
               (response tokens); 0 on prompts, padding and the first token of every sample,
               so make_batch's shift gives "predict token t+1 only where t+1 is a response
               token of the same sample"
  segment_ids  int64, 1..k for the k samples of a row, 0 for padding

Attention. `attention_mask(segment_ids)` is causal AND same segment (Megatron convention,
True = masked out), so packed samples never see each other. Position ids stay 0..s-1 along
the row: with RoPE, attention scores depend only on relative positions, and the mask keeps
every query inside its own sample, so a sample's outputs are the same as at positions
starting from 0. `needs_attention_mask` tells when plain causal attention already gives the
same result (every row one sample, possibly followed by padding), so callers skip the mask.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from xft_megatron.errors import UsageError


def first_fit(lengths: Sequence[int], order: Sequence[int], capacity: int) -> List[List[int]]:
    """Rows (lists of sample indices) from placing samples, in `order`, into the first row
    with room left (rows hold `capacity` tokens). O(n log n) with a max tree over rows."""
    lengths = [int(x) for x in lengths]
    size = 1
    while size < max(len(order), 1):
        size *= 2
    room = [capacity] * (2 * size)  # leaves size.. are rows; inner nodes: max of children
    rows: List[List[int]] = []
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"sample {i} has {need} tokens, more than a row of {capacity}")
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        row = node - size  # rows not opened yet are empty, so this is at most len(rows)
        if row == len(rows):
            rows.append([])
        rows[row].append(int(i))
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return rows


class PackedBatches:
    """Global batches of packed rows; `batches[step]` is a pure function of the step."""

    def __init__(self, dataset, seq_length: int, global_batch_size: int, seed: int,
                 packing: bool = True, pad_id: Optional[int] = None):
        """`dataset`: `len(dataset)`, `dataset[i] -> (ids, loss_mask)`; optional `lengths`
        (array of sample lengths) and `pad_id` attributes."""
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
        self.dataset, self.seq_length, self.batch_size = dataset, seq_length, global_batch_size
        self.seed, self.packing = seed, packing
        self.pad_id = pad_id if pad_id is not None else getattr(dataset, "pad_id", 0)
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            lengths = [len(dataset[i][0]) for i in range(len(dataset))]
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            raise UsageError("the dataset has no samples")
        width = seq_length + 1
        if lengths.max() > width:
            raise UsageError(f"a sample has {lengths.max()} tokens, more than seq_length + 1 = "
                             f"{width}; the dataset was built for a longer seq_length")
        if packing:
            order = np.random.default_rng([seed, 1]).permutation(len(lengths))
            self.rows = first_fit(lengths, order, width)
        else:
            self.rows = [[i] for i in range(len(lengths))]
        self.num_tokens = int(lengths.sum())
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        """Global batches per epoch."""
        return -(-len(self.rows) // self.batch_size)

    @property
    def fill(self) -> float:
        """Fraction of the epoch's token slots holding sample tokens."""
        return self.num_tokens / (len(self) * self.batch_size * (self.seq_length + 1))

    def row_order(self, epoch: int) -> np.ndarray:
        """The order in which `epoch` visits the rows."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, 2, epoch])
            self._order, self._order_epoch = rng.permutation(len(self.rows)), epoch
        return self._order

    def __getitem__(self, step: int) -> Dict[str, torch.Tensor]:
        if step < 0:
            raise IndexError(f"step {step} must be >= 0")
        epoch, j = divmod(step, len(self))
        picks = self.row_order(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
        width = self.seq_length + 1
        tokens = np.full((self.batch_size, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((self.batch_size, width), dtype=np.float32)
        segments = np.zeros((self.batch_size, width), dtype=np.int64)
        for r, row in enumerate(picks):
            pos = 0
            for k, index in enumerate(self.rows[row], start=1):
                ids, m = self.dataset[index]
                n = len(ids)
                tokens[r, pos:pos + n] = ids
                mask[r, pos:pos + n] = m
                mask[r, pos] = 0.0  # a sample's first token is never predicted
                segments[r, pos:pos + n] = k
                pos += n
        return {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask),
                "segment_ids": torch.from_numpy(segments)}


def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [b, s] -> bool [b, 1, s, s], True = masked out: query i may attend key j
    only if j <= i and both are in the same segment (padding, segment 0, is one segment)."""
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def needs_attention_mask(segment_ids: torch.Tensor) -> bool:
    """False when plain causal attention is equivalent for every target: each row is one
    sample (segment 1) optionally followed by padding (segment 0), which only attends back."""
    if segment_ids.numel() == 0:
        return False
    single = bool((segment_ids <= 1).all())
    non_increasing = bool((segment_ids[:, 1:] <= segment_ids[:, :-1]).all())
    return not (single and non_increasing)
