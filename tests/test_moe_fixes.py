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
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # really cast, so really run in bf16
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape == (4, 5)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_a_bf16_model_trains_with_the_load_balancing_loss():
    """In a model cast to bf16 (in training mode, weight 0.01): each MoE layer's load-balancing
    loss is 0.01 x the Switch value of its own router's logits; its gradient reaches the router
    as the definition's (computed here in float64) does; and the whole loss's gradients are
    finite bf16 tensors equal, to bf16 precision, to those of the same weights in fp32."""
    half = tiny_model().to(torch.bfloat16).train()
    full = tiny_model().train()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the same (bf16) weights
    layers = half.moe_layers()
    for m in layers + full.moe_layers():
        m.aux_loss_weight = 0.01
    seen = {}  # layer -> (router input, router logits) of the bf16 forward
    hooks = [m.router.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
             for i, m in enumerate(layers)]
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = half(x)
    for h in hooks:
        h.remove()

    chosen = {}
    for i, m in enumerate(layers):
        logits = seen[i][1].detach().reshape(-1, m.num_experts)  # every token of both images
        chosen[i] = logits.topk(m.top_k, dim=-1).indices
        assert logits.dtype == torch.bfloat16 and logits.shape == (2 * 17, m.num_experts)  # 16 patches + class
        expected = 0.01 * switch_loss(logits.float(), chosen[i].tolist(), m.num_experts)
        assert m.aux_loss.item() == pytest.approx(expected, rel=1e-5), i
    aux = half.aux_loss()
    assert aux.requires_grad, "the load-balancing loss has no gradient: it cannot train the router"
    assert aux.item() == pytest.approx(sum(m.aux_loss.item() for m in layers), rel=1e-6)

    # the last router: nothing else in the aux loss depends on it, so its gradient is its own layer's
    last, i = layers[-1], len(layers) - 1
    E = last.num_experts
    w = last.router.weight.detach().double().requires_grad_()
    b = last.router.bias.detach().double().requires_grad_()
    probs = torch.nn.functional.linear(seen[i][0].detach().double(), w, b).reshape(-1, E).softmax(-1)
    share = torch.nn.functional.one_hot(chosen[i], E).sum((0, 1)).double() / chosen[i].numel()  # f_e, a constant
    want = torch.autograd.grad(0.01 * E * (share * probs.mean(0)).sum(), [w, b])
    got = torch.autograd.grad(aux, [last.router.weight, last.router.bias], retain_graph=True)
    for g, r in zip(got, want):
        assert g.dtype == torch.bfloat16 and r.abs().max() > 1e-5
        torch.testing.assert_close(g.double(), r, rtol=0, atol=0.02 * r.abs().max().item())

    (out.float().square().mean() + aux).backward()
    (full(x.float()).square().mean() + full.aux_loss()).backward()
    for (name, p), q in zip(half.named_parameters(), full.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name
        g, r = p.grad.double().flatten(), q.grad.double().flatten()
        assert (g - r).norm() <= 0.1 * r.norm() and r.norm() > 0, name
