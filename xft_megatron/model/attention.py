"""Core attention through torch's scaled_dot_product_attention.

Drop-in for Megatron-Core's local `DotProductAttention` (which materializes the S x S score
matrix): causal, GQA without repeating K/V in memory, flash/memory-efficient kernels on GPU.
"""

import math
from typing import Optional

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; "
                             "set context parallel to 1")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None \
            else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None \
            else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        # query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes neither packed_seq_params nor attention_bias")
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None:
            # an explicit mask is complete (causality included), Megatron's convention
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
            causal = False
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal,
                      scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        if dropout > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                ctx = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

