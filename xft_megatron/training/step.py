"""One optimizer step through Megatron-Core's forward-backward schedules.

The loss is a per-token mean over the whole global batch (all microbatches, all data-parallel
ranks): each microbatch returns (sum of token losses, token count) and Megatron's
`finalize_model_grads` divides the reduced gradients by the global token count.
"""

from functools import partial
from typing import Dict, List, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from xft_megatron.checkpoint.dist import unwrap
from xft_megatron.data import packing
from xft_megatron.data.records import DataError
from xft_megatron.model.moe import losses as moe_losses
from xft_megatron.runtime import compat
from xft_megatron.training.optimizer import optimizer_step

Batch = Dict[str, torch.Tensor]


def make_batch(tokens: Union[torch.Tensor, Batch], loss_mask: torch.Tensor = None) -> Batch:
    """tokens [b, s+1] -> inputs/labels shifted by one, positions, loss mask [b, s].

    `tokens` may also be a packed batch (data/packing.py: tokens, loss_mask, segment_ids,
    all [b, s+1]); then `segment_ids` [b, s] are kept, from which each micro-batch's
    attention mask isolating the packed samples is built, and left out when plain causal
    attention is equivalent."""
    segment_ids = None
    if isinstance(tokens, dict):
        segment_ids, loss_mask, tokens = tokens.get("segment_ids"), tokens.get("loss_mask"), \
            tokens["tokens"]
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    b, s = inputs.shape
    mask = torch.ones(b, s, dtype=torch.float32) if loss_mask is None else \
        loss_mask[:, 1:].float().contiguous()
    positions = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()
    batch = {"tokens": inputs, "labels": labels, "loss_mask": mask, "position_ids": positions}
    if segment_ids is not None:
        segments = segment_ids[:, :-1]
        if packing.needs_attention_mask(segments):
            batch["segment_ids"] = segments.contiguous()  # the mask is built per micro-batch
    return batch


def _attention_mask(batch: Batch, device):
    """[b, 1, s, s] (True = masked out) isolating packed samples, or None (causal)."""
    if "segment_ids" not in batch:
        return None
    return packing.attention_mask(batch["segment_ids"].to(device))


def split_global_batch(batch: Batch, micro_batch_size: int) -> List[Batch]:
    """This data-parallel rank's slice of a global batch, cut into microbatches."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = batch["tokens"].shape[0]
    if n % (dp * micro_batch_size):
        raise ValueError(f"global batch of {n} samples does not split into data_parallel={dp} "
                         f"x micro_batch_size={micro_batch_size}")
    per_rank = n // dp
    mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i:i + micro_batch_size] for k, v in mine.items()}
            for i in range(0, per_rank, micro_batch_size)]


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    mask = loss_mask.reshape(-1)
    loss_sum = torch.sum(output.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], _attention_mask(batch, dev),
                   labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def forward_backward(chunks: List, microbatches: List[Batch], seq_length: int,
                     forward_only: bool = False) -> float:
    """Run the configured schedule over `microbatches`; returns the per-token mean loss over
    the global batch, identical on every rank. With MoE routers, their losses (balance, z)
    train as the mean over the global batch's forwards, whatever the loss mask
    (`router_loss_scale`)."""
    if not forward_only and moe_losses.has_routers(chunks):
        moe_losses.set_step_settings(chunks, aux_loss_scale=router_loss_scale(microbatches))
    total, count = loss_totals(chunks, microbatches, seq_length, forward_only)
    if count == 0 and not forward_only:
        raise EmptyBatch("the global batch has no target tokens (every loss mask is 0): "
                         "there is nothing to learn from it; check the data (responses, "
                         "data.columns, data.format)")
    return total / max(count, 1.0)


class EmptyBatch(DataError):
    """A training batch without a single target token."""


def router_loss_scale(microbatches: List[Batch]) -> float:
    """The factor on the router losses' gradient that makes them count as the mean over the
    forwards (micro-batches of every data-parallel rank) of the global batch, as the
    reference adds `coefficient x loss` once per forward: Megatron divides every gradient by
    the global batch's loss-token count N, so the factor is N / forwards. Identical on every
    rank (every pipeline stage holds the same micro-batches)."""
    local = torch.stack([mb["loss_mask"].sum().double() for mb in microbatches]).sum()
    totals = torch.stack([local, local.new_tensor(float(len(microbatches)))]).to(
        compat.device())
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    tokens, forwards = totals.tolist()
    return tokens / max(forwards, 1.0)


def loss_totals(chunks: List, microbatches: List[Batch], seq_length: int,
                forward_only: bool = True):
    """(sum of token losses, number of loss tokens) over the micro-batches of every
    data-parallel rank, identical on every rank (float64 sum, float count)."""
    return _reduce_reports(_schedule(_forward_step, chunks, microbatches, seq_length,
                                     forward_only))


def _schedule(step_func, chunks: List, microbatches: List[Batch], seq_length: int,
              forward_only: bool):
    """Megatron's schedule for this layout (no pipelining, 1F1B, interleaved) over the
    micro-batches; returns the loss functions' reports (last pipeline stage only)."""
    iters = [iter(microbatches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


def _reduce_reports(reports):
    # summed on the device: one host sync per step (the .item() below), not one per microbatch
    totals = torch.zeros(2, dtype=torch.float64, device=compat.device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for r in reports:
            totals += r["lm loss"].detach().to(torch.float64)
    # sum over data-parallel ranks, and hand the last stage's value to every stage
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    total, count = totals.tolist()
    return total, count


def _logits_step(data_iterator, model):
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    output = model(batch["tokens"].to(dev), batch["position_ids"].to(dev),
                   _attention_mask(batch, dev))  # [b, s, V/tp]

    def collect(out):
        full = gather_from_tensor_model_parallel_region(out)  # [b, s, V]
        return out.sum() * 0, torch.ones((), dtype=torch.int, device=out.device), \
            {"logits": full.detach()}

    return output, collect


def forward_logits(chunks: List, microbatches: List[Batch], seq_length: int) -> torch.Tensor:
    """Full-vocabulary logits [n, s, V] (float32, CPU) of the given micro-batches, on every
    rank, in any TP/SP/PP/EP layout. Every rank must pass the same micro-batches; the model's
    train/eval mode is left as the caller set it."""
    reports = _schedule(_logits_step, chunks, microbatches, seq_length, forward_only=True)
    b = sum(m["tokens"].shape[0] for m in microbatches)
    vocab = unwrap(chunks[0]).vocab_size
    logits = torch.empty(b, seq_length, vocab, dtype=torch.float32, device=compat.device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        logits.copy_(torch.cat([r["logits"].float() for r in reports], dim=0))
    dist.broadcast(logits, src=ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    return logits.cpu()


def train_step(chunks: List, optimizer, scheduler, microbatches: List[Batch],
               seq_length: int, clip_grad: float, loss_hook=None) -> Dict:
    """Zero grads, forward-backward, clip, optimizer step, LR step. `loss` is the language
    model loss plus the MoE router losses (summed over layers), both also reported apart.
    A non-finite loss or gradient skips the update (`skipped`); the LR schedule advances
    only on updates. With MoE layers, `expert_load` [layers, experts], `shared_weight`
    [layers] (mean g_0) and the routing diagnostics (`moe.routing.DIAGNOSTICS`, [layers]
    each) describe the step's routing. `loss_hook(loss) -> loss` may replace
    the reduced loss (fault injection in tests)."""
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    lr = optimizer.param_groups[0]["lr"]
    lm_loss = forward_backward(chunks, microbatches, seq_length)
    if loss_hook is not None:
        lm_loss = loss_hook(lm_loss)
    config = unwrap(chunks[0]).config
    stats = {}
    if config.num_moe_experts:
        stats = moe_losses.collect_routing(chunks, config.num_layers)
    router = moe_losses.collect(chunks, config.num_layers)
    moe_loss = float(router.sum())
    stepped, grad_norm = optimizer_step(optimizer, clip_grad, lm_loss + moe_loss)
    if stepped:
        scheduler.step(increment=1)
    return {"loss": lm_loss + moe_loss, "lm_loss": lm_loss, "moe_loss": moe_loss,
            "moe_layer_losses": router.tolist(), "grad_norm": grad_norm, "lr": lr,
            "skipped": not stepped, **stats}
