"""benchmarks/router_scale.py: the router's initial scale against routing at the first step,
with the router's own math on hidden states of a known norm (~3.6, as SmolLM2's pre-FFN norm
outputs): at the paper's 0.02 the clean logits are flat and the noise decides (g0 = E[1 - max
softmax] of the noise alone, about 0.69 with 7 routed experts), at a larger scale routing
depends on the token."""

import torch

from benchmarks import router_scale


def test_the_router_scale_moves_routing_from_noise_to_the_token():
    g = torch.Generator().manual_seed(0)
    inputs = {layer: torch.randn(2048, 64, generator=g) * 0.45 for layer in range(2)}
    paper, wide = (router_scale.measure(inputs, std, experts=8, topk=6) for std in (0.02, 1.0))
    assert paper["clean_entropy"] > 0.999 and paper["clean_spread"] < 0.01
    assert abs(paper["shared_weight"] - 0.69) < 0.03 and paper["set_survives"] < 0.1
    assert wide["clean_entropy"] < 0.8 and wide["clean_spread"] > 1.0
    assert wide["set_survives"] > 3 * paper["set_survives"]
    assert wide["shared_weight"] < paper["shared_weight"] - 0.2
