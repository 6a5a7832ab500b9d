"""Pure name/layout maps from an XFT MoE Megatron state dict to the HF MoE model defined by
`hf/remote/modeling_xft_moe.py` (export only).

HF names of an MoE layer `i` (dense layers keep the Llama names):
  model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight   (modes xft and none)
  model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight     (routed experts, j from 0)
  model.layers.{i}.mlp.router.{w1,w2}.weight (gate mlp) | router.proj.weight (gate linear)
  model.layers.{i}.mlp.router.noise.weight                        (noisy gating weights)
Megatron stores expert 0 (the shared one) first, then the routed experts in the router's
order; both layouts of the experts (grouped `fc1_weight` [N, 2, F, H] / `fc2_weight`
[N, H, F], or SequentialMLP's `local_experts.{j}`) are read.
"""

import os
from typing import Dict, List, Tuple

import torch

from xft_megatron.arch import families
from xft_megatron.arch import names
from xft_megatron.config import ModelConfig, MoEConfig
from xft_megatron.hf.llama import (Shapes, attention_to_hf, ffn_shapes, ffn_to_hf, hf_shapes,
                                   layer_to_hf)
from xft_megatron.hf.remote import MODELING_FILE

Tensor = torch.Tensor

ROUTER = {"weight": "proj.weight", "weight1": "w1.weight", "weight2": "w2.weight",
          "noise_weight": "noise.weight"}


def _experts(sd: Dict[str, Tensor], prefix: str, n: int) -> List[Tuple[Tensor, Tensor]]:
    """(fc1 [2F, H], fc2 [H, F]) of each of the n experts of the layer under `prefix`."""
    if prefix + names.EXPERT_FC1 in sd:
        fc1, fc2 = sd[prefix + names.EXPERT_FC1], sd[prefix + names.EXPERT_FC2]
        return [(fc1[j].reshape(-1, fc1.shape[-1]), fc2[j]) for j in range(n)]
    return [(sd[prefix + names.local_expert(j, names.FC1)],
             sd[prefix + names.local_expert(j, names.FC2)]) for j in range(n)]


def moe_layer_to_hf(sd: Dict[str, Tensor], m: ModelConfig, moe: MoEConfig,
                    i: int) -> Dict[str, Tensor]:
    """One decoder layer, Megatron names -> HF names (MoE layers as in the module docstring)."""
    if not moe.is_moe_layer(i):
        return layer_to_hf(sd, m, i)
    s, o = names.layer(i), f"model.layers.{i}.mlp."
    out = attention_to_hf(sd, m, i)
    experts = _experts(sd, s, moe.num_experts)
    if moe.has_shared_expert:
        out.update(ffn_to_hf(*experts[0], o + "shared_expert."))
        experts = experts[1:]
    for j, (fc1, fc2) in enumerate(experts):
        out.update(ffn_to_hf(fc1, fc2, f"{o}experts.{j}."))
    for name, hf_name in ROUTER.items():
        if s + names.ROUTER + name in sd:
            out[o + "router." + hf_name] = sd[s + names.ROUTER + name]
    return out


def moe_hf_shapes(m: ModelConfig, moe: MoEConfig) -> Shapes:
    """Name -> shape of every HF tensor of the MoE, in writing order (layer by layer)."""
    h, r = m.hidden_size, moe.num_routed
    router = {"proj.weight": (r, h)} if moe.router_gate == "linear" else \
        {"w1.weight": (r, h), "w2.weight": (r, r)}
    if moe.router_noise:
        router["noise.weight"] = (r, h)

    def layer_ffn(i: int) -> Shapes:
        o = f"model.layers.{i}.mlp."
        if not moe.is_moe_layer(i):
            return ffn_shapes(m, o)
        out = {o + "router." + k: v for k, v in router.items()}
        if moe.has_shared_expert:
            out.update(ffn_shapes(m, o + "shared_expert."))
        for j in range(r):
            out.update(ffn_shapes(m, f"{o}experts.{j}."))
        return out

    return hf_shapes(m, layer_ffn)


def moe_hf_config_dict(m: ModelConfig, moe: MoEConfig) -> Dict:
    """config.json of the MoE: the dense twin's, plus the remote-code classes of its family
    and `xft_moe`."""
    family = families.of(m)
    arch, config_class, model_type = family.moe_classes()
    module = os.path.splitext(os.path.basename(MODELING_FILE))[0]
    cfg = family.hf_config(m)
    cfg.update({
        "architectures": [arch],
        "model_type": model_type,
        "auto_map": {"AutoConfig": f"{module}.{config_class}",
                     "AutoModelForCausalLM": f"{module}.{arch}"},
        "xft_moe": {"num_experts": moe.num_experts, "topk": moe.topk, "mode": moe.mode,
                    "router_gate": moe.router_gate, "router_noise": moe.router_noise,
                    "renorm": moe.renorm,
                    "layers": [i for i in range(m.num_layers) if moe.is_moe_layer(i)]},
    })
    return cfg
