"""Upcycle and merge as pure transforms (../XFT_SPEC.md sections 1 and 4).

P2: upcycling then merging returns the dense weights for any coefficients and any lambda
(max |diff| <= 1e-6 * max |W|, fp32); merging distinct experts equals a float64 weighted sum
written here; coefficients follow the spec; bad lambda is refused."""

import pytest
import torch

from xft_megatron.config import MoEConfig
from xft_megatron.model.moe.merge_mlp import merge_coefficients
from xft_megatron.xft.merge import fold, merge_experts
from xft_megatron.xft.upcycle import experts_from_dense, router_weights, upcycle

H, F, LAYERS = 16, 24, 4


def _dense(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"embedding.word_embeddings.weight": torch.randn(32, H, generator=g)}
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        sd[p + "self_attention.linear_qkv.weight"] = torch.randn(3 * H, H, generator=g)
        sd[p + "mlp.linear_fc1.weight"] = torch.randn(2 * F, H, generator=g)
        sd[p + "mlp.linear_fc2.weight"] = torch.randn(H, F, generator=g)
    return sd


@pytest.mark.parametrize("layer_freq", [1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.75, 1.0])
def test_upcycle_then_merge_returns_dense(layer_freq, lam):
    dense = _dense()
    moe = MoEConfig(num_experts=8, topk=6, layer_freq=layer_freq)
    up = dict(upcycle(dense, moe, H, seed=3))
    moe_layers = [i for i in range(LAYERS) if i % layer_freq == 0]
    for i in range(LAYERS):
        p = f"decoder.layers.{i}.mlp."
        assert (p + "experts.fc1_weight" in up) == (i in moe_layers)
        assert (p + "linear_fc1.weight" in up) == (i not in moe_layers)
    g = torch.Generator().manual_seed(9)
    alphas = {i: torch.randn(7, generator=g) * 3 for i in moe_layers}
    back = dict(fold(up, lambda layer: merge_coefficients(alphas[layer], lam)))
    assert set(back) == set(dense)
    for k, w in dense.items():
        assert back[k].dtype == w.dtype and back[k].shape == w.shape
        assert (back[k] - w).abs().max() <= 1e-6 * w.abs().max(), k


def test_merge_of_distinct_experts_is_the_weighted_sum():
    g = torch.Generator().manual_seed(1)
    fc1, fc2 = torch.randn(5, 2, F, H, generator=g), torch.randn(5, H, F, generator=g)
    alpha = torch.randn(4, generator=g)
    c = merge_coefficients(alpha, 0.6)
    m1, m2 = merge_experts(fc1, fc2, c)
    s = torch.softmax(alpha.double(), 0)
    ref_c = [0.6] + [0.4 * s[i].item() for i in range(4)]
    ref1 = sum(ref_c[j] * fc1[j].double() for j in range(5)).reshape(2 * F, H)
    ref2 = sum(ref_c[j] * fc2[j].double() for j in range(5))
    assert torch.allclose(m1.double(), ref1, atol=1e-5) and torch.allclose(m2.double(), ref2,
                                                                            atol=1e-5)
    # gate rows first, then up rows, as the dense fc1 stores them
    assert torch.allclose(m1[:F].double(), ref1[:F])


def test_coefficients_follow_the_spec():
    c = merge_coefficients(torch.zeros(7), 0.75)  # uniform alpha
    assert c[0].item() == 0.75
    assert torch.allclose(c[1:], torch.full((7,), 0.25 / 7, dtype=torch.float64))
    c = merge_coefficients(torch.randn(7), 0.3)
    assert abs(c.sum().item() - 1) < 1e-12 and abs(c[0].item() - 0.3) < 1e-15
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"lambda\) must be in \[0, 1\]"):
            merge_coefficients(torch.zeros(7), bad)


def test_upcycle_copies_router_init_and_noise():
    fc1, fc2 = torch.randn(2 * F, H), torch.randn(H, F)
    e1, e2 = experts_from_dense(fc1, fc2, 4)
    assert all(torch.equal(e1[j].reshape(2 * F, H), fc1) and torch.equal(e2[j], fc2)
               for j in range(4))
    e1, e2 = experts_from_dense(fc1, fc2, 4, noise_std=0.01,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(e1[0].reshape(2 * F, H), fc1) and torch.equal(e2[0], fc2)  # shared
    assert not torch.equal(e1[1].reshape(2 * F, H), fc1)  # routed copies perturbed
    moe = MoEConfig(num_experts=8, topk=6, router_gate="mlp", router_noise=True)
    a, b = router_weights(moe, H, seed=1, layer=0), router_weights(moe, H, seed=1, layer=0)
    assert set(a) == {"weight1", "weight2", "noise_weight"}
    assert a["weight1"].shape == (7, H) and a["weight2"].shape == (7, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: reproducible
    c = router_weights(moe, H, seed=1, layer=1)
    assert not torch.equal(a["weight1"], c["weight1"])
    assert abs(a["weight1"].std().item() - 0.02) < 0.01
    wide = router_weights(MoEConfig(num_experts=8, topk=6, router_init_std=0.3), H, 1, 0)
    for k in a:  # the same draws at another scale (moe.router_init_std, upcycle --router-init-std)
        torch.testing.assert_close(wide[k], a[k] * 15, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="num_experts > 0"):
        list(upcycle(_dense(), MoEConfig(), H))
