"""The masked auto-encoder wrapper."""

import pytest
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


def _run_recording(mae, images):
    """mae(images), recording the encoder's input tokens and output and the decoder's input."""
    seen = {}
    forward_tokens = mae.encoder.forward_tokens

    def encoder(tokens):
        seen["kept"] = tokens.detach().clone()
        seen["latent"] = forward_tokens(tokens)
        return seen["latent"]

    mae.encoder.forward_tokens = encoder  # instance attribute: shadows the method for this model only
    hook = mae.decoder_blocks[0].register_forward_pre_hook(
        lambda m, args: seen.setdefault("decoder_in", args[0].detach()))
    try:
        loss, pred, mask = mae(images)
    finally:
        hook.remove()
        del mae.encoder.forward_tokens
    return loss, pred, mask, seen


def test_encoder_sees_the_visible_patches_and_the_decoder_puts_every_token_back_in_place():
    """Patches are told apart by content: the encoder must get exactly the patches the mask
    calls visible, and the decoder input must hold, at each patch's own position, that patch's
    encoding when visible and the mask token when hidden (each plus its position embedding)."""
    torch.manual_seed(0)
    mae = create_mae("xxs", overrides=TINY).eval()
    images = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        every_patch = mae.encoder.embed(images)  # [B, 144, D], all rows distinct
        _, pred, mask, seen = _run_recording(mae, images)
        decoded = mae.decoder_embed(seen["latent"])
    B, N = mask.shape
    n_keep = round(N * (1 - mae.mae_cfg.mask_ratio))
    assert mask.shape == (2, 144) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.sum(1) == N - n_keep).all() and seen["kept"].shape[1] == n_keep
    pos = mae.decoder_pos_embed[0].detach()
    for b in range(B):
        distance = (seen["kept"][b, :, None] - every_patch[b, None]).abs().sum(-1)  # [n_keep, N]
        source = distance.argmin(1)  # which patch each encoder token is
        assert (distance[torch.arange(n_keep), source] == 0).all()  # an exact copy of that patch
        assert sorted(source.tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
        expected = mae.mask_token[0, 0].detach() + pos[1:]  # hidden patches: the mask token
        expected[source] = decoded[b, 1:] + pos[1 + source]  # visible ones: their own encoding
        torch.testing.assert_close(seen["decoder_in"][b, 1:], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(seen["decoder_in"][b, 0], decoded[b, 0] + pos[0], rtol=0, atol=1e-6)
    assert not torch.equal(mask[0], mask[1])  # a random mask per image
    assert pred.shape == (2, 144, 27)


def test_hidden_patches_are_never_seen():
    """With the same mask (same seed), changing the pixels of a hidden patch leaves every
    prediction exactly as it was; changing a visible patch does not."""
    mae = create_mae("xxs", overrides=TINY).eval()
    images = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        torch.manual_seed(1)
        _, pred, mask = mae(images)
        hidden, visible = torch.nonzero(mask[0] == 1)[0].item(), torch.nonzero(mask[0] == 0)[0].item()

        def changed(patch):
            r, c = divmod(patch, 12)  # 12 x 12 patches of 3 x 3 pixels, row-major
            other = images.clone()
            other[0, :, 3 * r:3 * r + 3, 3 * c:3 * c + 3] += 5.0
            torch.manual_seed(1)
            _, other_pred, other_mask = mae(other)
            assert torch.equal(other_mask, mask)
            return other_pred

        torch.testing.assert_close(changed(hidden), pred, rtol=0, atol=0)
        assert not torch.allclose(changed(visible), pred)


def test_loss_is_masked_mse_plus_discounted_visible_mse():
    """From the spec: MSE over the hidden patches + visible_loss_weight x MSE over the visible
    ones (0.1 in the presets), on hand-made predictions that are wrong in one patch only."""
    mae = create_mae("xxs", overrides=TINY)
    assert mae.mae_cfg.visible_loss_weight == 0.1
    images = torch.rand(2, 3, 36, 36)
    target = mae.target(images)
    mask = torch.zeros(2, 144)
    mask[:, :108] = 1.0  # 108 hidden and 36 visible patches per image
    assert mae.forward_loss(images, target, mask).item() == pytest.approx(0.0, abs=1e-12)
    wrong_hidden, wrong_visible = target.clone(), target.clone()
    wrong_hidden[1, 5] += 2.0  # squared error 4 on every value of one hidden patch
    wrong_visible[0, 120] += 2.0  # ... of one visible patch
    assert mae.forward_loss(images, wrong_hidden, mask).item() == pytest.approx(4.0 / (2 * 108), rel=1e-5)
    assert mae.forward_loss(images, wrong_visible, mask).item() == pytest.approx(0.1 * 4.0 / (2 * 36), rel=1e-5)


def test_loss_is_differentiable_everywhere():
    torch.manual_seed(1)
    mae = create_mae("xxs", overrides=TINY)
    loss, pred, mask = mae(torch.randn(3, 3, 36, 36))
    assert torch.isfinite(loss) and pred.shape == (3, 144, 27)
    loss.backward()
    for name, p in mae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_norm_pix_loss_normalises_each_target_patch():
    mae = create_mae("xxs", overrides=TINY)
    t = mae.target(torch.rand(2, 3, 36, 36))
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 144), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 144), atol=1e-3, rtol=0)
    mae_raw = create_mae("xxs", overrides=TINY + ["mae.norm_pix_loss=false"])
    x = torch.rand(2, 3, 36, 36)
    torch.testing.assert_close(mae_raw.target(x), patchify(x, 3))


def test_encoder_state_loads_into_a_classifier_unchanged():
    mae = create_mae("xxs", overrides=TINY)
    clf = create_model("xxs", num_classes=10, overrides=TINY)
    enc = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
    missing, unexpected = clf.load_state_dict(enc, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected


def test_a_mask_that_hides_nothing_is_refused():
    """A ratio that rounds to no hidden patch (or a one-patch image) would train on the
    discounted visible-patch loss alone, silently; the decoder's head counts must be positive
    (0 was a ZeroDivisionError, -1 a shape error at the first step)."""
    from mmlit_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mask_ratio 0.003 hides none of the 144 patches: it must be above 0.00347"):
        create_mae("xxs", mask_ratio=0.003)
    assert create_mae("xxs", mask_ratio=0.004).random_masking(torch.zeros(1, 144, 4), 0.004)[0].shape[1] == 143
    with pytest.raises(ConfigError, match="image is one patch"):
        create_mae("xxs", overrides=["model.patch_size=36"])
    for key in ("decoder_heads", "decoder_kv_heads"):
        for bad in (0, -1):
            with pytest.raises(ConfigError, match="decoder_heads, decoder_kv_heads and decoder_mlp_hidden must be "
                                                  "positive"):
                create_mae("xxs", **{key: bad})
    mae = create_mae("xxs", overrides=["model.depth=1"])
    for ratio in (-1.0, 0.0, 1.0, 2.0):  # forward's own mask_ratio is checked as the preset's is
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            mae(torch.zeros(1, 3, 36, 36), mask_ratio=ratio)
