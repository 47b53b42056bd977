"""The mLiT network: MoE identity, routing, GQA, presets forward/backward."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmlit_cli import create_model
from mmlit_cli.config import ModelConfig
from mmlit_cli.model import GroupedQueryAttention, MLiT, MoEFeedForward

PRESET_TOTALS = {"s": 2_364_390, "xs": 1_209_408, "xxs": 658_637}


def moe_oracle(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The layer from the spec alone, with its own routing (nothing shared with the code under
    test): gates = the router's softmax over all experts, kept for each token's k largest logits
    and renormalised to sum to one (equal to a softmax over the k chosen logits); then
    sum_e g_e * W2(silu(x W1_e) * (x V)), reading W1_e and V from the documented row layout of
    `w1v` ([W1_0; ...; W1_{E-1}; V])."""
    E, H, k = moe.num_experts, moe.hidden, moe.top_k
    logits = x @ moe.router.weight.T + moe.router.bias
    probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    chosen = logits.argsort(-1, descending=True)[..., :k]
    keep = torch.zeros_like(probs).scatter(-1, chosen, 1.0)
    gates = probs * keep / (probs * keep).sum(-1, keepdim=True)
    W, b = moe.w1v.weight, moe.w1v.bias
    xv = x @ W[E * H:].T + b[E * H:]
    out = torch.zeros_like(x)
    for e in range(E):
        z = x @ W[e * H:(e + 1) * H].T + b[e * H:(e + 1) * H]
        expert = (z / (1 + torch.exp(-z)) * xv) @ moe.w2.weight.T + moe.w2.bias
        out = out + gates[..., e:e + 1] * expert
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_fused_and_naive_moe_equal_an_independent_float64_oracle_outputs_and_grads(top_k):
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=24, hidden=16, num_experts=5, top_k=top_k).double()
    for p in moe.parameters():  # non-trivial biases too
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 11, 24, dtype=torch.float64, requires_grad=True)
    params = [x, *moe.parameters()]

    ref = moe_oracle(moe, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for impl in (moe.forward, moe.forward_naive):
        out = impl(x)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        for g, r in zip(torch.autograd.grad(out.square().sum(), params), ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    # every parameter takes part (with k=1 a softmax over one logit is constant: no router gradient)
    assert all(g.abs().sum() > 0 for g in (ref_grads[:1] + ref_grads[3:] if top_k == 1 else ref_grads))


def _hand_set_router(k: int) -> MoEFeedForward:
    """4 experts whose router logits are the token itself plus a bias of 0.5 on expert 3."""
    moe = MoEFeedForward(dim=4, hidden=3, num_experts=4, top_k=k)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
        moe.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    return moe


TOKENS = torch.tensor([[2.0, 1.0, -1.0, 0.0],    # router logits [2, 1, -1, 0.5]
                       [0.0, -0.5, 3.0, 0.0]])   # router logits [0, -0.5, 3, 0.5]


def _softmax(*logits: float) -> list[float]:
    z = sum(math.exp(v) for v in logits)
    return [math.exp(v) / z for v in logits]


def test_gates_are_the_softmax_of_the_chosen_logits_exactly():
    a2, b2 = _softmax(2.0, 1.0), _softmax(3.0, 0.5)
    a3, b3 = _softmax(2.0, 1.0, 0.5), _softmax(3.0, 0.5, 0.0)
    expected = {  # k: (gates, chosen experts, largest logit first)
        1: ([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], [[0], [2]]),
        2: ([[a2[0], a2[1], 0.0, 0.0], [0.0, 0.0, b2[0], b2[1]]], [[0, 1], [2, 3]]),
        3: ([[a3[0], a3[1], 0.0, a3[2]], [b3[2], 0.0, b3[0], b3[1]]], [[0, 1, 3], [2, 3, 0]]),
    }
    for k, (gates_expected, idx_expected) in expected.items():
        gates, idx = _hand_set_router(k).route(TOKENS)
        torch.testing.assert_close(gates, torch.tensor(gates_expected), rtol=0, atol=1e-6)
        assert idx.tolist() == idx_expected


def test_load_balancing_loss_is_the_switch_formula():
    moe = _hand_set_router(2)
    moe.aux_loss_weight = 0.01
    x = torch.cat([TOKENS, TOKENS[:1]])  # experts 0 and 1 get two tokens each, 2 and 3 one each
    moe.train()
    moe(x)
    probs = torch.tensor([_softmax(2.0, 1.0, -1.0, 0.5), _softmax(0.0, -0.5, 3.0, 0.5), _softmax(2.0, 1.0, -1.0, 0.5)])
    share = torch.tensor([2.0, 2.0, 1.0, 1.0]) / 6  # routed slots per expert / all slots
    expected = 0.01 * 4 * (share * probs.mean(0)).sum()  # weight * E * sum_e share_e * mean prob_e
    torch.testing.assert_close(moe.aux_loss, expected, rtol=1e-6, atol=0)
    assert moe.aux_loss.requires_grad
    moe.eval()
    moe(x)
    assert moe.aux_loss is None  # only while training


def test_router_noise_only_in_training():
    torch.manual_seed(2)
    moe = MoEFeedForward(dim=16, hidden=8, num_experts=4, top_k=2, router_noise=5.0)
    x = torch.randn(4, 20, 16)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x), rtol=0, atol=0)  # deterministic at eval
    moe.train()
    assert not torch.allclose(moe(x), moe(x))  # noise changes the routing while training
    moe.router_noise = 0.0
    torch.testing.assert_close(moe(x), moe(x), rtol=0, atol=0)  # and nothing else is random


def test_expert_usage_counts_the_experts_each_token_is_routed_to():
    torch.manual_seed(3)
    model = create_model("xxs", num_classes=10, depth=3, embed_dim=24, num_heads=2, num_kv_heads=1,
                         mlp_hidden_first=16, mlp_hidden_last=8)
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
             for m in model.moe_layers()]
    model.set_usage_tracking(True)
    with torch.no_grad():
        model(torch.randn(5, 3, 36, 36))
    for h in hooks:
        h.remove()
    for moe, x, usage in zip(model.moe_layers(), inputs, model.expert_usage(), strict=True):
        logits = x @ moe.router.weight.T + moe.router.bias  # the routing, recomputed here
        expected = torch.bincount(logits.argsort(-1, descending=True)[..., :2].flatten(), minlength=moe.num_experts)
        assert expected.sum() == 5 * (144 + 1) * 2  # two slots per token
        assert moe.expert_counts.tolist() == expected.tolist()
        assert usage == pytest.approx((expected / expected.sum()).tolist())


def test_gqa_equals_attention_written_out_from_the_weights():
    """Query heads g*G .. g*G+G-1 share key/value head g (G = query heads per kv head); q, k
    and v are the rows of the fused projection, in that order. The oracle reads the weights."""
    torch.manual_seed(4)
    H, KV, hd, D = 8, 2, 4, 32
    attn = GroupedQueryAttention(dim=D, num_heads=H, num_kv_heads=KV).double()
    x = torch.randn(2, 13, D, dtype=torch.float64)
    W, b = attn.qkv.weight, attn.qkv.bias
    q = (x @ W[:H * hd].T + b[:H * hd]).unflatten(-1, (H, hd))
    k = (x @ W[H * hd:(H + KV) * hd].T + b[H * hd:(H + KV) * hd]).unflatten(-1, (KV, hd))
    v = (x @ W[(H + KV) * hd:].T + b[(H + KV) * hd:]).unflatten(-1, (KV, hd))
    heads = []
    for h in range(H):
        g = h // (H // KV)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hd)
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        heads.append(weights / weights.sum(-1, keepdim=True) @ v[:, :, g])
    ref = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 4, 144), (6, 3, 108), (8, 4, 128), (4, 4, 72)])
def test_every_kernel_layout_gives_the_attention_and_its_gradients_as_built(heads, kv_heads, dim):
    """Heads zero-padded (18 -> 24, 32) and K/V repeated per query head change how SDPA is
    called, never the values: outputs and the gradients of the input and of every weight equal
    the layout as built, in float64. The weights' shapes and the state dict do not change."""
    torch.manual_seed(5)
    attn = GroupedQueryAttention(dim, heads, kv_heads).double()
    keys = {k: v.shape for k, v in attn.state_dict().items()}
    x = torch.randn(3, 17, dim, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 17, dim, dtype=torch.float64)
    ref = attn(x)
    ref_grads = torch.autograd.grad(ref, [x, *attn.parameters()], grad_out)
    d = dim // heads
    layouts = set(attn.kernel_layouts()) | {(d + 14, False), (d + 14, True)}
    assert (d, False) in layouts and len(layouts) > 2
    for layout in sorted(layouts - {(d, False)}):
        attn.set_kernel_layout(*layout)
        out = attn(x)
        grads = torch.autograd.grad(out, [x, *attn.parameters()], grad_out)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=f"layout {layout}")
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=f"layout {layout}")
    assert {k: v.shape for k, v in attn.state_dict().items()} == keys


def test_kernel_layouts_offer_a_multiple_of_8_and_kv_repeat_only_where_they_mean_something():
    assert GroupedQueryAttention(144, 8, 4).kernel_layouts() == [(18, False), (24, False), (18, True), (24, True)]
    assert GroupedQueryAttention(64, 4, 2).kernel_layouts() == [(16, False), (16, True)]
    assert GroupedQueryAttention(64, 4, 4).kernel_layouts() == [(16, False)]
    attn = GroupedQueryAttention(64, 4, 4)
    attn.set_kernel_layout(16, True)  # nothing to repeat without grouped K/V
    assert attn.kernel_layout() == (16, False)
    with pytest.raises(ValueError, match="below the head dim"):
        attn.set_kernel_layout(8, False)


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


def record_moe_inputs(model) -> list[torch.Tensor]:
    """Fills with each MoE layer's input on the next forward pass."""
    inputs: list[torch.Tensor] = []
    for m in model.moe_layers():
        m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().float()))
    return inputs


def assert_every_gradient_flows(model, moe_inputs: list[torch.Tensor]) -> None:
    """Every parameter gets a finite, non-zero gradient, and so does every part of one that the
    loss depends on: each position-embedding row; in every MoE layer, V and the W1 rows and
    router row of each expert some token that matters was routed to - every token, except in
    the last block, whose output reaches the head through the class token alone - and exactly
    those experts."""
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert (model.pos_embed.grad[0].abs().sum(-1) > 0).all(), "a position-embedding row gets no gradient"
    last = len(model.moe_layers()) - 1
    for i, (moe, x) in enumerate(zip(model.moe_layers(), moe_inputs, strict=True)):
        tokens = x[:, :1] if i == last else x
        logits = tokens @ moe.router.weight.float().T + moe.router.bias.float()
        routed = torch.zeros(moe.num_experts, dtype=torch.bool)
        routed[logits.topk(moe.top_k, dim=-1).indices.flatten()] = True
        rows = moe.w1v.weight.grad.unflatten(0, (moe.num_experts + 1, moe.hidden))
        assert ((rows.abs().sum((1, 2)) > 0) == torch.cat([routed, torch.tensor([True])])).all(), \
            f"block {i}: W1 gradients do not match the routing"
        assert ((moe.router.weight.grad.abs().sum(-1) > 0) == routed).all(), f"block {i}: router gradients"
        if i < last:
            assert routed.all(), f"block {i}: an expert got no token (the check would be weaker)"


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
@pytest.mark.parametrize("image_size", [36, 24])
def test_every_preset_runs_forward_and_backward(preset, image_size):
    torch.manual_seed(5)
    model = create_model(preset, num_classes=7, image_size=image_size)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the zero-initialised head would zero every other gradient
    moe_inputs = record_moe_inputs(model)
    x = torch.randn(4, 3, image_size, image_size)
    logits = model(x)
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 3, 0, 6])).backward()
    assert_every_gradient_flows(model, moe_inputs)
    assert model.pos_embed.shape[1] == (image_size // 3) ** 2 + 1


def test_an_empty_batch_gives_empty_logits_as_any_torch_module_does():
    """A batch of 0 images (the last, empty chunk of a split, a filter that kept nothing) is a
    batch like any other: [0, classes] logits, in training and in eval, and a backward pass."""
    model = create_model("xxs", num_classes=7)
    logits = model(torch.empty(0, 3, 36, 36))
    assert logits.shape == (0, 7)
    logits.sum().backward()
    assert model.eval()(torch.empty(0, 3, 36, 36)).shape == (0, 7)


def test_head_reads_the_class_token_only():
    """The logits change when the final class-token features change and not when any patch
    token's do (edited on the way out of the last LayerNorm, so the whole forward is tested)."""
    torch.manual_seed(6)
    model = create_model("xxs", num_classes=4, depth=3).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 36, 36)
    edit = {}
    model.norm.register_forward_hook(lambda mod, args, out: edit["fn"](out) if "fn" in edit else out)
    with torch.no_grad():
        out = model(x)

        def new_patches(feats):
            feats = feats.clone()
            feats[:, 1:] = torch.randn_like(feats[:, 1:])
            return feats

        edit["fn"] = new_patches
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        edit["fn"] = lambda feats: torch.cat([feats[:, :1] + 1.0, feats[:, 1:]], dim=1)
        assert (model(x) - out).abs().min() > 1e-3  # every logit moves


def test_invalid_model_config_is_a_clear_error():
    from mmlit_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="num_kv_heads"):
        create_model("xxs", num_kv_heads=4)  # 6 heads are not a multiple of 4
    with pytest.raises(ConfigError, match="patch_size"):
        create_model("xxs", image_size=35)


def test_the_python_api_says_what_is_wrong_as_timm_would():
    """Input of the wrong size, dtype or rank is named at the model's door (not a shape error
    from deep inside); create_model's arguments are checked by type; timm's `pretrained`
    argument is taken (and refused when true: mmlit ships no weights)."""
    from mmlit_cli import create_mae
    from mmlit_cli.errors import ConfigError, MmlitError

    model = create_model("xxs", num_classes=10)
    for x in (torch.randn(1, 3, 32, 32), torch.zeros(1, 3, 36, 36, dtype=torch.uint8), torch.randn(3, 36, 36)):
        with pytest.raises(ValueError, match=r"mLiT takes float images \[N, 3, 36, 36\]"):
            model(x)
    with pytest.raises(ValueError, match=r"takes a torch.Tensor of float images \[N, 3, 36, 36\], got a ndarray"):
        model(np.zeros((1, 3, 36, 36), np.float32))  # was AttributeError: 'numpy.ndarray' object has no attribute 'dim'
    with pytest.raises(ValueError, match=r"weights are torch.float32 and its input torch.float64: pass "
                                         r"x.to\(torch.float32\)"):
        model(torch.randn(1, 3, 36, 36, dtype=torch.float64))  # was torch's "Input type (double) and bias type"
    half = create_model("xxs", num_classes=10).to(torch.bfloat16)
    with pytest.raises(ValueError, match="weights are torch.bfloat16 and its input torch.float32"):
        half(torch.randn(1, 3, 36, 36))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the input itself...
        assert half(torch.randn(1, 3, 36, 36)).shape == (1, 10)
        with pytest.raises(ValueError, match="input torch.float64"):  # ...but not float64
            half(torch.randn(1, 3, 36, 36, dtype=torch.float64))
    for bad in (2.5, True, "10"):
        with pytest.raises(ConfigError, match="model.num_classes: expected an integer"):
            create_model("xxs", num_classes=bad)
    with pytest.raises(MmlitError, match="no pretrained weights"):
        create_model("xxs", pretrained=True)
    with pytest.raises(MmlitError, match="pass num_classes=10 by name"):
        create_model("xxs", 10)
    assert create_model("xxs", False, num_classes=3).num_classes == 3
    assert create_model("xxs", overrides="model.depth=2").cfg.depth == 2  # one --set as a string
    assert create_mae("xxs", mask_ratio=0.5).mae_cfg.mask_ratio == 0.5
    with pytest.raises(ConfigError, match="mask_ratio"):
        create_mae("xxs", mask_ratio=1.5)


def test_reset_classifier_gives_a_new_head_as_timm_does():
    model = create_model("xxs", num_classes=10).to(torch.float64)
    assert model.num_classes == 10 and model.get_classifier() is model.head
    features = model.forward_features(torch.randn(2, 3, 36, 36, dtype=torch.float64))[:, 0]
    model.reset_classifier(4)
    out = model(torch.randn(2, 3, 36, 36, dtype=torch.float64))
    assert out.shape == (2, 4) and out.dtype == torch.float64 and not out.any()  # zero-initialised, as built
    assert model.num_classes == 4 and model.pretrained_cfg["num_classes"] == 4
    model.reset_classifier(0)
    x = torch.randn(2, 3, 36, 36, dtype=torch.float64)
    assert torch.equal(model(x), model.forward_features(x)[:, 0]) and features.shape == (2, 108)


def test_timm_names_for_features_pooling_and_class_names():
    """timm's `num_features`, `forward_head(pre_logits=True)` and `reset_classifier(n,
    global_pool)`; a reset to another number of classes drops the names of the old head."""
    model = create_model("xxs", num_classes=3, depth=2)
    model.class_names = ["cat", "dog", "owl"]
    model.pretrained_cfg["label_names"] = list(model.class_names)
    x = torch.randn(2, 3, 36, 36)
    features = model.forward_features(x)
    assert model.num_features == 108 == model.forward_head(features, pre_logits=True).shape[1]
    assert torch.equal(model.forward_head(features, pre_logits=True), features[:, 0])
    model.reset_classifier(3, global_pool="token")  # the same classes: a new head for the same names
    assert model.class_names == ["cat", "dog", "owl"] == model.pretrained_cfg["label_names"]
    model.reset_classifier(5)
    assert model.class_names is None and model.pretrained_cfg["label_names"] is None
    with pytest.raises(ValueError, match="pools by its class token"):
        model.reset_classifier(5, global_pool="avg")


def test_create_model_checks_its_keywords_as_set_does():
    from mmlit_cli import create_mae
    from mmlit_cli.errors import ConfigError, MmlitError

    with pytest.raises(ConfigError, match=r"create_model: unknown key 'model.foo' \(known keys: image_size"):
        create_model("xxs", foo=1)
    with pytest.raises(ConfigError, match="model.depth: expected an integer, got .2."):
        create_model("xxs", depth="2")
    assert create_model("xxs", drop_path_rate=0.1).cfg.drop_path == 0.1  # timm's name for it
    for bad in ({"pretrained": "runs/x/best.safetensors"}, {"checkpoint_path": "runs/x/best.safetensors"}):
        with pytest.raises(MmlitError, match=r"builds a new model: load a trained checkpoint with .*load_model"):
            create_model("xxs", **bad)
    with pytest.raises(ConfigError, match="create_mae: unknown key 'mae.depth'"):
        create_mae("xxs", depth=2)  # the encoder's keys go to overrides=
    mae = create_mae("xxs", image_size=24, overrides="model.depth=2", mask_ratio=0.5)
    assert (mae.model_cfg.image_size, mae.model_cfg.depth, mae.mae_cfg.mask_ratio) == (24, 2, 0.5)


def test_bf16_autocast_forward_backward_and_fp32_gates():
    torch.manual_seed(7)
    model = create_model("xxs", num_classes=5, depth=3)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    moe_inputs = record_moe_inputs(model)
    x = torch.randn(2, 3, 36, 36)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        gates, _ = model.moe_layers()[0].route(torch.randn(4, 108, dtype=torch.bfloat16))
    assert gates.dtype == torch.float32  # what CUDA autocast's fp32 softmax produces too
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    F.cross_entropy(logits.float(), torch.tensor([0, 3])).backward()
    assert_every_gradient_flows(model, moe_inputs)


def test_router_collapse_is_flagged_per_layer():
    from mmlit_cli.metrics import collapsed_layers

    usage = [[0.5, 0.5, 0.0], [0.3, 0.3, 0.4], [0.2, 0.2, 0.2, 0.395, 0.005]]
    assert collapsed_layers(usage) == [0, 2]
    assert collapsed_layers([[1 / 3] * 3]) == []


def test_torch_export_takes_the_model_with_a_dynamic_batch():
    """What an edge engineer hands to ExecuTorch or TensorRT: torch.export's program of the
    classifier, any batch size, the model's function."""
    model = create_model("xxs", num_classes=10, depth=2).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(2, 3, 36, 36),), dynamic_shapes=({0: batch},))
    x = torch.randn(5, 3, 36, 36)
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
