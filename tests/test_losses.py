"""EPD-Net losses (the paper's equations 1-12) against values worked out by hand."""

import dataclasses
import math
import warnings

import pytest
import torch

from epd_ray.core.losses import (
    LossWeights,
    adversarial_loss,
    contrastive_identity_loss,
    discriminator_loss,
    emotion_loss,
    generator_loss,
    identity_diversity_loss,
    ssim,
    ssim_loss,
    ssim_per_image,
    ssim_window,
)

torch.set_num_threads(2)
LOG2 = math.log(2.0)


def textured(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 1.6 - 0.8


# ------------------------------------------------------------------ adversarial


def test_bce_at_logit_zero_is_log2():
    z = torch.zeros(4, 1, 2, 2)
    assert adversarial_loss(z).item() == pytest.approx(LOG2, abs=1e-6)
    assert discriminator_loss(z, z).item() == pytest.approx(LOG2, abs=1e-6)  # 0.5 * (log2 + log2)


def test_discriminator_loss_halves_the_sum_and_averages_over_patches():
    big = torch.full((3, 1, 2, 2), 30.0)
    # D perfect: ~0. D exactly wrong on the real pair only: 0.5 * (30 + 0) = 15.
    assert discriminator_loss(big, -big).item() == pytest.approx(0.0, abs=1e-6)
    assert discriminator_loss(-big, -big).item() == pytest.approx(15.0, rel=1e-4)
    # average over patches: half the patches at logit 0, half at +30 (fake judged real: BCE(30, 0) = 30)
    fake = torch.zeros(1, 1, 2, 2)
    fake[..., 0, :] = 30.0
    expected = 0.5 * (0.0 + (LOG2 + 30.0) / 2)
    assert discriminator_loss(big[:1], fake).item() == pytest.approx(expected, rel=1e-4)


def test_adversarial_loss_small_when_d_is_fooled():
    assert adversarial_loss(torch.full((2, 1, 3, 3), 30.0)).item() < 1e-6
    assert adversarial_loss(torch.full((2, 1, 3, 3), -30.0)).item() == pytest.approx(30.0, rel=1e-4)


# ------------------------------------------------------------------ contrastive hinge


def onehot_logits(labels, m, big=100.0):
    """Logits whose softmax is one-hot on `labels` to float32 precision (exp(-100) underflows)."""
    logits = torch.zeros(len(labels), m)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = big
    return logits


@pytest.mark.parametrize("alpha", [0.3, 1.0, math.sqrt(2)])
def test_hinge_at_distance_zero_is_alpha_squared(alpha):
    logits = onehot_logits([0, 2], 3)  # verifier certain of the true identity: distance 0
    loss = contrastive_identity_loss(logits, torch.tensor([0, 2]), alpha)
    assert loss.item() == pytest.approx(alpha**2, abs=1e-6)


def test_hinge_at_half_alpha_is_alpha_squared_over_four():
    # Equal logits over M=2: softmax (1/2, 1/2), distance ||(1,0)-(1/2,1/2)|| = sqrt(2)/2.
    # With alpha = sqrt(2) that is alpha/2, so the loss is (alpha - alpha/2)^2 = alpha^2/4 = 0.5.
    alpha = math.sqrt(2)
    loss = contrastive_identity_loss(torch.zeros(3, 2), torch.tensor([0, 1, 0]), alpha)
    assert loss.item() == pytest.approx(alpha**2 / 4, abs=1e-6)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)


def test_hinge_uniform_over_four():
    # softmax (1/4, 1/4, 1/4, 1/4): distance^2 = (3/4)^2 + 3 * (1/4)^2 = 0.75
    d = math.sqrt(0.75)
    loss = contrastive_identity_loss(torch.zeros(1, 4), torch.tensor([1]), 1.2)
    assert loss.item() == pytest.approx((1.2 - d) ** 2, abs=1e-6)


def test_hinge_beyond_alpha_is_zero():
    # one-hot on ANOTHER identity: distance sqrt 2 > alpha; uniform over 4: sqrt(0.75) = 0.866 > 0.5
    assert contrastive_identity_loss(onehot_logits([1], 3), torch.tensor([0]), 1.0).item() == 0.0
    assert contrastive_identity_loss(torch.zeros(2, 4), torch.tensor([0, 3]), 0.5).item() == 0.0


def test_hinge_is_batch_mean():
    logits = torch.cat([onehot_logits([0], 2), onehot_logits([1], 2)])  # distances 0 and sqrt 2
    loss = contrastive_identity_loss(logits, torch.tensor([0, 0]), 1.0)
    assert loss.item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, -1.0, 1.5])
def test_hinge_rejects_alpha_outside_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        contrastive_identity_loss(torch.zeros(1, 2), torch.tensor([0]), alpha)


def test_emotion_loss_is_cross_entropy():
    # equal logits over 7 classes: -log(1/7)
    assert emotion_loss(torch.zeros(3, 7), torch.tensor([0, 3, 6])).item() == pytest.approx(math.log(7), abs=1e-6)


# ------------------------------------------------------------------ SSIM


@pytest.mark.parametrize("size,win", [(32, 7), (64, 11), (128, 11), (256, 11), (16, 3)])
def test_ssim_window_fits_image(size, win):
    assert ssim_window(size) == win
    assert ssim_window(size) % 2 == 1 and ssim_window(size) < size


@pytest.mark.parametrize("size", [32, 64])
def test_ssim_term_zero_at_identity_and_large_at_negation(size):
    x = textured(2, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pytorch_msssim warns when the window does not fit
        assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
        assert ssim_loss(x, -x).item() > 0.5
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)


def test_ssim_per_image_shape_order_and_range():
    x = textured(3, 32)
    noise = torch.zeros_like(x)
    noise[1] = 0.3 * torch.randn_like(x[1])
    per = ssim_per_image(x, (x + noise).clamp(-1, 1))
    assert per.shape == (3,) and per.dtype == torch.float32
    assert per[0].item() == pytest.approx(1.0, abs=1e-5) and per[1].item() < 0.9


def test_ssim_computed_in_float32_under_autocast():
    x, y = textured(2, 32, 0), textured(2, 32, 1)
    ref = ssim(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ssim(x.bfloat16(), y.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), abs=1e-2)


# ------------------------------------------------------------------ generator total


def test_loss_weights_validation_and_frozen():
    w = LossWeights(lambda1=0.5, lambda2=0.25, lambda3=1.0, phi=0.25, alpha=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.phi = 1.0  # type: ignore[misc]
    for bad in (dict(lambda1=1.5), dict(lambda3=-0.1), dict(phi=-1.0), dict(alpha=2.0), dict(alpha=0.0)):
        with pytest.raises(ValueError):
            dataclasses.replace(w, **bad)


def _generator_inputs():
    torch.manual_seed(0)
    x = textured(2, 32)
    x_hat = textured(2, 32, seed=5).requires_grad_(True)
    w_d = torch.randn(3, 6, 4, 4) * 0.1
    w_id = torch.randn(3 * 32 * 32, 4) * 0.01
    w_em = torch.randn(3 * 32 * 32, 7) * 0.01
    fake_logits = torch.nn.functional.conv2d(torch.cat([x, x_hat], 1), w_d, stride=8).mean(1, keepdim=True)
    identity_logits = x_hat.flatten(1) @ w_id
    emotion_logits = x_hat.flatten(1) @ w_em
    return x, x_hat, fake_logits, identity_logits, torch.tensor([0, 2]), emotion_logits, torch.tensor([3, 5])


def test_generator_total_matches_hand_sum():
    x, x_hat, fake, id_logits, id_lab, em_logits, em_lab = _generator_inputs()
    w = LossWeights(lambda1=0.5, lambda2=0.3, lambda3=0.2, phi=0.25, alpha=1.4)
    total, parts = generator_loss(fake, x, x_hat, id_logits, id_lab, em_logits, em_lab, w)
    assert set(parts) == {"adv", "ssim", "cgan", "contrastive", "emotion_ce", "diversity", "total"}
    adv = adversarial_loss(fake)
    st = ssim_loss(x, x_hat)
    con = contrastive_identity_loss(id_logits, id_lab, 1.4)
    ce = emotion_loss(em_logits, em_lab)
    assert parts["adv"].item() == pytest.approx(adv.item(), abs=1e-6)
    assert parts["cgan"].item() == pytest.approx(adv.item() + 0.25 * st.item(), abs=1e-6)
    hand = 0.5 * (adv.item() + 0.25 * st.item()) + 0.3 * con.item() + 0.2 * ce.item()
    assert total.item() == pytest.approx(hand, abs=1e-6)
    assert parts["total"] is total
    assert con.item() > 0  # the contrastive term is active (distance < alpha), so its gradient exists


def test_diversity_is_the_chance_that_v_reads_two_faces_of_one_person_as_one_person():
    sure = 20.0 * torch.eye(3)  # logits V reads surely as persons 0, 1, 2
    # faces 0 and 1 are one person; face 2 another, whose reading counts for no pair
    one_stand_in = identity_diversity_loss(sure[[1, 1, 1]], torch.tensor([0, 0, 1]))
    two_stand_ins = identity_diversity_loss(sure[[1, 2, 1]], torch.tensor([0, 0, 1]))
    assert one_stand_in.item() == pytest.approx(1.0, abs=1e-6)
    assert two_stand_ins.item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(2, 3, requires_grad=True)
    alone = identity_diversity_loss(logits, torch.tensor([0, 1]))  # no two faces of one person
    assert alone.item() == 0.0
    alone.backward()
    assert logits.grad is not None


def test_diversity_weight_adds_its_term_to_the_total():
    x, x_hat, fake, id_logits, _, em_logits, em_lab = _generator_inputs()
    same_person = torch.tensor([1, 1])
    plain, _ = generator_loss(fake, x, x_hat, id_logits, same_person, em_logits, em_lab, LossWeights(alpha=1.4))
    total, parts = generator_loss(fake, x, x_hat, id_logits, same_person, em_logits, em_lab,
                                  LossWeights(alpha=1.4, diversity=0.5))
    assert parts["diversity"].item() > 0
    assert total.item() == pytest.approx(plain.item() + 0.5 * parts["diversity"].item(), abs=1e-6)


@pytest.mark.parametrize("term", ["adv", "ssim", "contrastive", "emotion_ce", "total"])
def test_gradient_reaches_x_hat_through_every_term(term):
    x, x_hat, fake, id_logits, id_lab, em_logits, em_lab = _generator_inputs()
    w = LossWeights(lambda1=1.0, lambda2=1.0, lambda3=1.0, phi=0.25, alpha=1.4)
    _, parts = generator_loss(fake, x, x_hat, id_logits, id_lab, em_logits, em_lab, w)
    (grad,) = torch.autograd.grad(parts[term], x_hat)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_zero_weights_switch_terms_off():
    x, x_hat, fake, id_logits, id_lab, em_logits, em_lab = _generator_inputs()
    w = LossWeights(lambda1=1.0, lambda2=0.0, lambda3=0.0, phi=0.0, alpha=1.0)
    total, parts = generator_loss(fake, x, x_hat, id_logits, id_lab, em_logits, em_lab, w)
    assert total.item() == pytest.approx(parts["adv"].item(), abs=1e-7)
