"""The mLiT network: MoE identity, routing, GQA, presets forward/backward."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmlit_cli import create_model
from mmlit_cli.config import ModelConfig
from mmlit_cli.model import GroupedQueryAttention, MLiT, MoEFeedForward

PRESET_TOTALS = {"s": 2_364_390, "xs": 1_209_408, "xxs": 658_637}


def test_fused_moe_equals_naive_per_expert_form_outputs_and_grads():
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=24, hidden=16, num_experts=5, top_k=2).double()
    for p in moe.parameters():  # non-trivial biases too
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 11, 24, dtype=torch.float64, requires_grad=True)

    out = moe(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *moe.parameters()])
    ref = moe.forward_naive(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *moe.parameters()])

    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


def test_each_token_gets_exactly_k_experts_with_gates_summing_to_one():
    torch.manual_seed(1)
    for k in (1, 2, 3):
        moe = MoEFeedForward(dim=16, hidden=8, num_experts=4, top_k=k)
        gates, idx = moe.route(torch.randn(2, 30, 16))
        assert idx.shape == (2, 30, k)
        assert ((gates > 0).sum(-1) == k).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(2, 30))
    moe = MoEFeedForward(dim=16, hidden=8, num_experts=4, top_k=2)
    x = torch.randn(50, 16)
    gates, idx = moe.route(x)
    top = moe.router(x).topk(2, dim=-1).indices
    assert torch.equal(idx, top)


def test_router_noise_only_in_training_and_aux_loss_when_enabled():
    torch.manual_seed(2)
    moe = MoEFeedForward(dim=16, hidden=8, num_experts=4, top_k=2, router_noise=5.0, aux_loss_weight=0.01)
    x = torch.randn(4, 20, 16)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))  # deterministic at eval
    assert moe.aux_loss is None
    moe.train()
    a, b = moe(x), moe(x)
    assert not torch.allclose(a, b)  # noise changes the routing while training
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad and moe.aux_loss > 0


def test_expert_usage_counts_tokens_per_expert():
    torch.manual_seed(3)
    model = create_model("xxs", num_classes=10, depth=3, embed_dim=24, num_heads=2, num_kv_heads=1,
                         mlp_hidden_first=16, mlp_hidden_last=8)
    model.set_usage_tracking(True)
    model(torch.randn(5, 3, 36, 36))
    tokens = 5 * (144 + 1)
    for layer, moe in enumerate(model.moe_layers()):
        assert moe.expert_counts.sum().item() == tokens * 2  # top-2: two slots per token
        assert len(model.expert_usage()[layer]) == moe.num_experts
    assert all(abs(sum(u) - 1) < 1e-6 for u in model.expert_usage())


def test_gqa_equals_plain_multihead_attention_with_repeated_kv_heads():
    torch.manual_seed(4)
    attn = GroupedQueryAttention(dim=32, num_heads=8, num_kv_heads=2).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    q, k, v = attn.split_qkv(x)
    rep = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    weights = (q @ k.transpose(-2, -1) / attn.head_dim**0.5).softmax(-1)
    ref = attn.proj((weights @ v).transpose(1, 2).reshape(2, 13, 32))
    torch.testing.assert_close(attn(x), ref)


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
def test_preset_parameter_counts_match_the_spec(preset):
    model = create_model(preset, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == PRESET_TOTALS[preset]


def test_depthwise_scaling_and_staged_experts_follow_the_spec():
    cfg = ModelConfig(depth=15, mlp_hidden_first=144, mlp_hidden_last=72, expert_stages=[3, 4, 5])
    hidden = cfg.hidden_sizes()
    assert hidden[0] == 144 and hidden[-1] == 72 and hidden == sorted(hidden, reverse=True)
    assert cfg.experts_per_layer() == [3] * 5 + [4] * 5 + [5] * 5
    model = MLiT(dataclasses.replace(cfg, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_hidden_first=20,
                                     mlp_hidden_last=8))
    assert [m.num_experts for m in model.moe_layers()] == cfg.experts_per_layer()
    assert [m.hidden for m in model.moe_layers()] == [int((14 - i) / 14 * 12) + 8 for i in range(15)]


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
@pytest.mark.parametrize("image_size", [36, 24])
def test_every_preset_runs_forward_and_backward(preset, image_size):
    torch.manual_seed(5)
    model = create_model(preset, num_classes=7, image_size=image_size)
    x = torch.randn(2, 3, image_size, image_size)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.pos_embed.shape[1] == (image_size // 3) ** 2 + 1


def test_head_on_class_token_only():
    torch.manual_seed(6)
    model = create_model("xxs", num_classes=4, depth=3).eval()
    torch.nn.init.normal_(model.head.weight)
    feats = model.forward_features(torch.randn(2, 3, 36, 36))
    torch.testing.assert_close(model.forward_head(feats), model.head(feats[:, 0]))


def test_invalid_model_config_is_a_clear_error():
    from mmlit_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="num_kv_heads"):
        create_model("xxs", num_kv_heads=4)  # 6 heads are not a multiple of 4
    with pytest.raises(ConfigError, match="patch_size"):
        create_model("xxs", image_size=35)


def test_bf16_autocast_forward_backward_and_fp32_gates():
    torch.manual_seed(7)
    model = create_model("xxs", num_classes=5, depth=3)
    x = torch.randn(2, 3, 36, 36)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        gates, _ = model.moe_layers()[0].route(torch.randn(4, 108, dtype=torch.bfloat16))
    assert gates.dtype == torch.float32  # what CUDA autocast's fp32 softmax produces too
    logits.float().sum().backward()
    assert torch.isfinite(logits.float()).all() and model.head.weight.grad is not None


def test_router_collapse_is_flagged_per_layer():
    from mmlit_cli.metrics import collapsed_layers

    usage = [[0.5, 0.5, 0.0], [0.3, 0.3, 0.4], [0.2, 0.2, 0.2, 0.395, 0.005]]
    assert collapsed_layers(usage) == [0, 2]
    assert collapsed_layers([[1 / 3] * 3]) == []
