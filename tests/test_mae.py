"""The masked auto-encoder wrapper."""

import torch

from mmlit_cli import create_mae, create_model
from mmlit_cli.mae import patchify, unpatchify

TINY = ["model.depth=3", "model.embed_dim=24", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_hidden_first=16", "model.mlp_hidden_last=8", "mae.decoder_dim=16",
        "mae.decoder_heads=2", "mae.decoder_kv_heads=1", "mae.decoder_mlp_hidden=16"]


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 36, 36)
    p = patchify(x, 3)
    assert p.shape == (2, 144, 27)
    torch.testing.assert_close(unpatchify(p, 3, 3), x)
    torch.testing.assert_close(p[0, 1], x[0, :, 0:3, 3:6].permute(1, 2, 0).reshape(-1))


def test_masking_keeps_exactly_the_right_number_of_tokens_per_image():
    torch.manual_seed(0)
    mae = create_mae("xxs", overrides=TINY)
    tokens = torch.randn(4, 144, 24)
    for ratio in (0.75, 0.5, 0.9):
        kept, mask, ids_restore = mae.random_masking(tokens, ratio)
        n_keep = round(144 * (1 - ratio))
        assert kept.shape == (4, n_keep, 24)
        assert (mask.sum(1) == 144 - n_keep).all()
        # the kept tokens are exactly the unmasked ones, in some order
        for b in range(4):
            visible = tokens[b][mask[b] == 0]
            assert torch.equal(visible.sort(0).values, kept[b].sort(0).values)
        assert not torch.equal(mask[0], mask[1])  # random per image


def test_loss_is_finite_and_differentiable_and_weights_visible_patches():
    torch.manual_seed(1)
    mae = create_mae("xxs", overrides=TINY)
    images = torch.randn(3, 3, 36, 36)
    loss, pred, mask = mae(images)
    assert pred.shape == (3, 144, 27) and torch.isfinite(loss)
    loss.backward()
    assert mae.encoder.patch_embed.proj.weight.grad is not None and mae.mask_token.grad is not None

    # forward_loss = masked MSE + discount * visible MSE
    target = mae.target(images)
    per_patch = (pred.detach() - target).pow(2).mean(-1)
    expected = per_patch[mask == 1].mean() + mae.mae_cfg.visible_loss_weight * per_patch[mask == 0].mean()
    torch.testing.assert_close(mae.forward_loss(images, pred.detach(), mask), expected)


def test_norm_pix_loss_normalises_each_target_patch():
    mae = create_mae("xxs", overrides=TINY)
    t = mae.target(torch.rand(2, 3, 36, 36))
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 144), atol=1e-5, rtol=0)
    mae_raw = create_mae("xxs", overrides=TINY + ["mae.norm_pix_loss=false"])
    x = torch.rand(2, 3, 36, 36)
    torch.testing.assert_close(mae_raw.target(x), patchify(x, 3))


def test_encoder_state_loads_into_a_classifier_unchanged():
    mae = create_mae("xxs", overrides=TINY)
    clf = create_model("xxs", num_classes=10, overrides=TINY)
    enc = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
    missing, unexpected = clf.load_state_dict(enc, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
