"""EPD-Net losses, exactly the paper's equations 1-12, and one term outside the paper, L_diversity (weight 0
unless a config sets `loss.diversity`).

Images are in [-1, 1] (network convention) and are mapped to [0, 1] for SSIM. Every loss is computed in
float32 even inside a bf16 autocast region: logits are upcast before BCE / softmax / cross-entropy, and
SSIM runs with autocast disabled (its variance terms are differences of squares, which bf16's 8-bit
mantissa turns into noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _msssim_ssim

from epd_ray.core.images import to_unit

# --------------------------------------------------------------------------------------------------
# Adversarial terms (pix2pix, with logits)
# --------------------------------------------------------------------------------------------------


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D = 0.5 * (BCE(D(x, y_real), 1) + BCE(D(x, G(x, z)), 0)), each averaged over all patches.

    The 0.5 is pix2pix's: it slows D relative to G.
    """
    real = real_logits.float()
    fake = fake_logits.float()
    loss_real = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    loss_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    return 0.5 * (loss_real + loss_fake)


def adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_adv = BCE(D(x, G(x, z)), 1), averaged over patches (the non-saturating generator loss)."""
    fake = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


# --------------------------------------------------------------------------------------------------
# Structure (SSIM)
# --------------------------------------------------------------------------------------------------

SSIM_SIGMA_PER_TAP = 1.5 / 11  # the standard 11-tap window has sigma 1.5 (Wang et al. 2004)


def ssim_window(image_size: int) -> int:
    """Odd Gaussian window size for SSIM fitted to the image side.

    11 (the standard, sigma 1.5) from 64 px up; below, the largest odd number <= side / 4 - 1 (7 at
    32 px, 3 at 16 px). pytorch_msssim computes SSIM over the "valid" region only and silently skips
    smoothing along a side shorter than the window, so the window must be well below the side: with
    side / 4 it leaves a valid region of at least three quarters of the image.
    """
    size = int(image_size)
    if size < 4:
        raise ValueError(f"image_size must be >= 4 for SSIM, got {image_size!r}")
    win = min(11, size // 4 - 1)
    if win % 2 == 0:
        win -= 1
    return max(win, 1)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair of images given in [-1, 1]: a float32 tensor of shape (N,).

    Mapped to [0, 1] (data_range 1), Gaussian window from `ssim_window(min(H, W))` with sigma scaled to
    its size, averaged over channels. Runs in float32 with autocast disabled. Differentiable.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"ssim expects NCHW tensors, got shape {tuple(x.shape)}")
    win = ssim_window(min(x.shape[-2:]))
    with torch.autocast(device_type=x.device.type, enabled=False):
        a = to_unit(x.float())
        b = to_unit(y.float())
        return _msssim_ssim(
            a, b, data_range=1.0, size_average=False, win_size=win, win_sigma=SSIM_SIGMA_PER_TAP * win
        )


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM over a batch of image pairs in [-1, 1] (scalar tensor, differentiable)."""
    return ssim_per_image(x, y).mean()


def ssim_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """L_ssim = (1 - SSIM(x, x_hat)) / 2, in [0, 1]: 0 for identical images."""
    return (1.0 - ssim(x, x_hat)) * 0.5


# --------------------------------------------------------------------------------------------------
# Identity and emotion terms
# --------------------------------------------------------------------------------------------------

MAX_IDENTITY_DISTANCE = math.sqrt(2.0)  # ||one-hot - p||_2 for p one-hot on another class


def contrastive_identity_loss(
    identity_logits: torch.Tensor, identity_labels: torch.Tensor, alpha: float
) -> torch.Tensor:
    """L_contrastive = mean( max(0, alpha - ||I_x - softmax(V(x_hat))||_2)^2 ) (paper eq. 9).

    I_x is the one-hot identity. The distance lies in [0, sqrt 2]; once the verifier's output is farther
    than alpha from the true identity the term is 0, so alpha in (0, sqrt 2] sets "how far is far enough".
    torch.linalg.vector_norm's gradient at distance 0 (a verifier saturated on the true identity) is
    defined as 0, not NaN.
    """
    if not 0.0 < alpha <= MAX_IDENTITY_DISTANCE + 1e-9:
        raise ValueError(f"alpha must be in (0, sqrt(2)], got {alpha!r}")
    probs = torch.softmax(identity_logits.float(), dim=1)
    onehot = F.one_hot(identity_labels.long(), num_classes=probs.shape[1]).to(probs.dtype)
    distance = torch.linalg.vector_norm(onehot - probs, dim=1)
    return torch.clamp(alpha - distance, min=0.0).pow(2).mean()


def identity_diversity_loss(identity_logits: torch.Tensor, identity_labels: torch.Tensor) -> torch.Tensor:
    """L_diversity: the mean, over pairs of distinct faces in the batch of the same person, of
    sum_c softmax(V(x_hat_i))_c softmax(V(x_hat_j))_c, the chance that V reads the two as one person.

    Not in the paper. L_contrastive is met by any other identity, so the generator learns one stand-in per
    person, the same in every photograph, and an attacker who de-identifies photographs of known people with
    the tool names the person again (the parrot attack). With each face drawn twice per step (its noise z
    differs), this asks the two draws, and two photographs of one person, for different stand-ins. 0 when
    the batch holds no two faces of one person.
    """
    probs = torch.softmax(identity_logits.float(), dim=1)
    same = identity_labels[:, None] == identity_labels[None, :]
    same.fill_diagonal_(False)
    if not bool(same.any()):
        return probs.sum() * 0.0
    return (probs @ probs.T)[same].mean()


def emotion_loss(emotion_logits: torch.Tensor, emotion_labels: torch.Tensor) -> torch.Tensor:
    """L_CE = cross_entropy(S(x_hat), E_x) (the categorical form of the paper's eq. 10)."""
    return F.cross_entropy(emotion_logits.float(), emotion_labels.long())


# --------------------------------------------------------------------------------------------------
# Generator total
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator loss: L_G = l1 * (L_adv + phi * L_ssim) + l2 * L_contrastive + l3 * L_CE
    + diversity * L_diversity.

    lambdas in [0, 1] (paper eq. 11), phi >= 0 (the paper finds 0.25), alpha in (0, sqrt 2], diversity in
    [0, 1] (0: the paper's loss).
    """

    lambda1: float = 1.0
    lambda2: float = 1.0
    lambda3: float = 1.0
    phi: float = 0.25
    alpha: float = 1.0
    diversity: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lambda1", "lambda2", "lambda3", "diversity"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.phi < 0.0:
            raise ValueError(f"phi must be >= 0, got {self.phi!r}")
        if not 0.0 < self.alpha <= MAX_IDENTITY_DISTANCE + 1e-9:
            raise ValueError(f"alpha must be in (0, sqrt(2)], got {self.alpha!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def generator_loss(
    fake_logits: torch.Tensor,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    identity_logits: torch.Tensor,
    identity_labels: torch.Tensor,
    emotion_logits: torch.Tensor,
    emotion_labels: torch.Tensor,
    weights: LossWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_G = lambda1 * L_cGAN + lambda2 * L_contrastive + lambda3 * L_CE + diversity * L_diversity,
    L_cGAN = L_adv + phi * L_ssim.

    fake_logits = D(x, x_hat); identity_logits = V(x_hat); emotion_logits = S(x_hat); x_hat = G(x, z).
    Returns (total, parts) with parts keys adv, ssim, cgan, contrastive, emotion_ce, diversity, total. The
    parts are graph-attached (not detached) so that a caller can also backpropagate one of them; call
    `.item()` or `.detach()` to log them.
    """
    adv = adversarial_loss(fake_logits)
    structure = ssim_loss(x, x_hat)
    cgan = adv + weights.phi * structure
    contrastive = contrastive_identity_loss(identity_logits, identity_labels, weights.alpha)
    emotion_ce = emotion_loss(emotion_logits, emotion_labels)
    diversity = identity_diversity_loss(identity_logits, identity_labels)
    total = (weights.lambda1 * cgan + weights.lambda2 * contrastive + weights.lambda3 * emotion_ce
             + weights.diversity * diversity)
    parts = {
        "adv": adv,
        "ssim": structure,
        "cgan": cgan,
        "contrastive": contrastive,
        "emotion_ce": emotion_ce,
        "diversity": diversity,
        "total": total,
    }
    return total, parts
