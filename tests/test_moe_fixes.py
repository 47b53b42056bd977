"""The mixture of experts: the load-balancing loss has the Switch Transformer's value, and a
model cast to bf16 runs (issue 12, bugs 6 and 7). Expected values are computed here from the
definitions, never with the model's own helpers."""

import dataclasses

import pytest
import torch

from helpers import TINY

from mmlit_cli.config import load_config
from mmlit_cli.model import MLiT, MoEFeedForward


def switch_loss(logits: torch.Tensor, chosen: list[list[int]], num_experts: int) -> float:
    """N * sum_i f_i * P_i: f_i = share of all token->expert assignments that went to expert i,
    P_i = mean over tokens of the router's softmax probability of expert i."""
    counts = [0] * num_experts
    for experts in chosen:
        for e in experts:
            counts[e] += 1
    total = sum(counts)
    probs = torch.softmax(logits.double(), dim=-1).mean(0).tolist()
    return num_experts * sum(c / total * p for c, p in zip(counts, probs))


def router_moe(num_experts: int, top_k: int) -> MoEFeedForward:
    """A MoE whose router logits are 10 x the input (dim = number of experts): the test picks
    each token's experts by the input it gives."""
    moe = MoEFeedForward(dim=num_experts, hidden=4, num_experts=num_experts, top_k=top_k, aux_loss_weight=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(10 * torch.eye(num_experts))
        moe.router.bias.zero_()
    return moe.train()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_perfectly_balanced_routing_gives_exactly_one_for_any_k(top_k):
    E = 4
    moe = router_moe(E, top_k)
    # token t prefers experts t, t+1, ... (cyclically): each expert is chosen equally often and,
    # by the same symmetry, gets the same mean probability
    chosen = [[(t + j) % E for j in range(top_k)] for t in range(E)]
    x = torch.zeros(E, E)
    for t, experts in enumerate(chosen):
        x[t, experts] = 1.0
    moe(x.unsqueeze(0))
    expected = switch_loss(10 * x, chosen, E)
    assert expected == pytest.approx(1.0, abs=1e-12)
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_every_token_on_one_expert_gives_the_maximum_number_of_experts():
    E = 4
    moe = router_moe(E, top_k=1)
    x = torch.zeros(6, E)
    x[:, 2] = 3.0  # logit 30 for expert 2: its probability is 1 to within 1e-12
    moe(x.unsqueeze(0))
    expected = switch_loss(10 * x, [[2]] * 6, E)
    assert expected == pytest.approx(E, rel=1e-9)  # the largest value the loss can take: N
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_top2_routing_concentrated_on_two_experts():
    E = 5
    moe = router_moe(E, top_k=2)
    x = torch.zeros(8, E)
    x[:, 0], x[:, 3] = 3.0, 2.9  # experts 0 and 3 for every token, 0 a bit more likely
    moe(x.unsqueeze(0))
    expected = switch_loss(10 * x, [[0, 3]] * 8, E)
    assert expected == pytest.approx(E / 2, rel=1e-3)  # f = P = 1/2 on two experts: N / k
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_weight_scales_the_loss():
    moe = router_moe(4, top_k=2)
    moe.aux_loss_weight = 0.01
    x = torch.randn(3, 7, 4)
    moe(x)
    logits = moe.router(x).reshape(-1, 4)
    chosen = logits.topk(2, dim=-1).indices.tolist()
    assert moe.aux_loss.item() == pytest.approx(0.01 * switch_loss(logits.detach(), chosen, 4), rel=1e-5)


def tiny_model() -> MLiT:
    cfg = load_config("xxs", TINY).model
    torch.manual_seed(0)
    model = MLiT(dataclasses.replace(cfg, num_classes=5))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would make every output 0
    return model


def test_a_model_cast_to_bf16_runs_forward_and_matches_fp32():
    model = tiny_model().eval()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        half = model.to(torch.bfloat16)
        out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_a_bf16_model_trains_with_the_load_balancing_loss():
    model = tiny_model().to(torch.bfloat16).train()
    for m in model.moe_layers():
        m.aux_loss_weight = 0.01
    x = torch.randn(2, 3, 12, 12).to(torch.bfloat16)
    loss = model(x).float().square().mean() + model.aux_loss()
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].ffn.router.weight.grad is not None
