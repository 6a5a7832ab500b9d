"""XFT Mixture-of-Experts for Hugging Face transformers, written by xft-megatron.

A Llama, Mistral, Qwen2 or Qwen3 decoder whose FFN, in the layers listed in
`config.xft_moe["layers"]`, is the XFT MoE (arXiv 2404.15247):
  - expert 0 is the SHARED expert (always active), the others are ROUTED; every expert is a
    SwiGLU FFN like the dense one;
  - the router scores the routed experts (gate `mlp`: W2 tanh(W1 x), or `linear`: W x) in
    fp32; s = softmax(h); the top-(K-1) routed experts are selected;
  - routing weight normalization: g_0 = 1 - max(s); g_i = max(s) * softmax(s_T)_i on the
    selected experts (renorm `probs`) or max(s) * s_i / sum_T s (renorm `linear`);
  - mode `none`: g_0 = 1, g_i = s_i (no normalization); mode `vanilla`: no shared expert,
    g_i = s_i / sum_T s.
  y = g_0 E_0(x) + sum_i g_i E_i(x).

This is the inference model: every token reaches its experts (no capacity limit), the noisy
gating weights (`router.noise`) are kept for a lossless export but not used, and no balance
loss is computed. Ties among router scores go to the lower expert index.

Loading: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, \
    Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM


def routing_weights(probs: torch.Tensor, k: int, mode: str, renorm: str):
    """probs [T, R] (fp32) -> (weights [T, E], selected [T, E] bool); column 0 is the shared
    expert in modes xft/none, every column a routed expert in mode vanilla."""
    top, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    top, idx = top[:, :k], idx[:, :k]
    if mode == "xft":
        s_max = top[:, :1]
        routed = s_max * (torch.softmax(top, dim=-1) if renorm == "probs"
                          else top / top.sum(dim=-1, keepdim=True))
        shared = 1.0 - s_max
    elif mode == "none":
        routed, shared = top, torch.ones_like(top[:, :1])
    else:
        routed, shared = top / top.sum(dim=-1, keepdim=True), None
    weights = torch.zeros_like(probs).scatter(1, idx, routed)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, True)
    if shared is not None:
        weights = torch.cat([shared, weights], dim=1)
        selected = torch.cat([torch.ones_like(selected[:, :1]), selected], dim=1)
    return weights, selected


class XFTExpert(nn.Module):
    """One SwiGLU FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class XFTRouter(nn.Module):
    """Router logits over the routed experts, computed in fp32."""

    def __init__(self, hidden_size: int, num_routed: int, gate: str, noise: bool):
        super().__init__()
        self.kind = gate
        if gate == "linear":
            self.proj = nn.Linear(hidden_size, num_routed, bias=False)
        else:
            self.w1 = nn.Linear(hidden_size, num_routed, bias=False)
            self.w2 = nn.Linear(num_routed, num_routed, bias=False)
        if noise:  # noisy gating is a training-time regularizer: kept, not used here
            self.noise = nn.Linear(hidden_size, num_routed, bias=False)

    def forward(self, x):
        x = x.float()
        if self.kind == "linear":
            return F.linear(x, self.proj.weight.float())
        return F.linear(torch.tanh(F.linear(x, self.w1.weight.float())), self.w2.weight.float())


class XFTMoeBlock(nn.Module):
    """The XFT MoE FFN of one layer (see the module docstring)."""

    def __init__(self, config):
        super().__init__()
        moe = config.xft_moe
        self.mode, self.renorm = moe["mode"], moe["renorm"]
        shared = self.mode in ("xft", "none")
        num_routed = moe["num_experts"] - (1 if shared else 0)
        self.routed_topk = moe["topk"] - (1 if shared else 0)
        h, f = config.hidden_size, config.intermediate_size
        self.router = XFTRouter(h, num_routed, moe["router_gate"], moe["router_noise"])
        self.shared_expert = XFTExpert(h, f) if shared else None
        self.experts = nn.ModuleList(XFTExpert(h, f) for _ in range(num_routed))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x), dim=-1)
        weights, selected = routing_weights(probs, self.routed_topk, self.mode, self.renorm)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        first = 0
        if self.shared_expert is not None:
            out += weights[:, :1] * self.shared_expert(x).float()
            first = 1
        for j, expert in enumerate(self.experts):
            tokens = selected[:, first + j].nonzero().squeeze(-1)
            if tokens.numel():
                y = expert(x[tokens]).float() * weights[tokens, first + j, None]
                out.index_add_(0, tokens, y)
        return out.to(hidden_states.dtype).reshape(shape)


def _install_moe(model) -> None:
    for i in model.config.xft_moe["layers"]:
        model.model.layers[i].mlp = XFTMoeBlock(model.config)


class XFTLlamaMoeConfig(LlamaConfig):
    model_type = "xft_moe_llama"


class XFTLlamaMoeForCausalLM(LlamaForCausalLM):
    config_class = XFTLlamaMoeConfig

    def __init__(self, config):
        super().__init__(config)
        _install_moe(self)
        self.post_init()


class XFTMistralMoeConfig(MistralConfig):
    model_type = "xft_moe_mistral"


class XFTMistralMoeForCausalLM(MistralForCausalLM):
    config_class = XFTMistralMoeConfig

    def __init__(self, config):
        super().__init__(config)
        _install_moe(self)
        self.post_init()


class XFTQwen2MoeConfig(Qwen2Config):
    model_type = "xft_moe_qwen2"


class XFTQwen2MoeForCausalLM(Qwen2ForCausalLM):
    config_class = XFTQwen2MoeConfig

    def __init__(self, config):
        super().__init__(config)
        _install_moe(self)
        self.post_init()


class XFTQwen3MoeConfig(Qwen3Config):
    model_type = "xft_moe_qwen3"


class XFTQwen3MoeForCausalLM(Qwen3ForCausalLM):
    config_class = XFTQwen3MoeConfig

    def __init__(self, config):
        super().__init__(config)
        _install_moe(self)
        self.post_init()
