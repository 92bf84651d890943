"""Score a de-identification method: de-identify a split once, then let judges measure it.

The same de-identified images are judged by the independent evaluators (the honest figures) and by the
training verifiers (the figures comparable with the paper, and flattered: the generator was trained
against them). Images are judged as they would be published: quantised to 8 bits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from epd_ray.core.images import to_tensor, to_uint8
from epd_ray.core.losses import ssim_per_image
from epd_ray.core.metrics import compute_metrics
from epd_ray.core.precision import autocast

Method = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def deidentify_pixels(method: Method, pixels: np.ndarray, *, batch_size: int, device: torch.device,
                      precision: str = "fp32") -> np.ndarray:
    """Apply `method` (float NCHW in [-1, 1] to the same) to uint8 NHWC pixels, batch by batch."""
    out = []
    for start in range(0, len(pixels), batch_size):
        x = to_tensor(pixels[start:start + batch_size]).to(device)
        with autocast(device, precision):
            y = method(x)
        out.append(to_uint8(y.float().clamp(-1, 1).cpu()))
    return np.concatenate(out) if out else np.empty_like(pixels)


@torch.no_grad()
def class_probabilities(net: nn.Module, pixels: np.ndarray, *, batch_size: int, device: torch.device,
                        precision: str = "fp32") -> torch.Tensor:
    net.eval()
    probs = []
    for start in range(0, len(pixels), batch_size):
        x = to_tensor(pixels[start:start + batch_size]).to(device)
        with autocast(device, precision):
            logits = net(x)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(probs)


@torch.no_grad()
def ssim_values(original: np.ndarray, deidentified: np.ndarray, batch_size: int) -> torch.Tensor:
    """SSIM of each de-identified image against its original, batch by batch."""
    return torch.cat([
        ssim_per_image(to_tensor(original[s:s + batch_size]), to_tensor(deidentified[s:s + batch_size]))
        for s in range(0, len(original), batch_size)
    ])


@torch.no_grad()
def judge(original: np.ndarray, deidentified: np.ndarray, identity: np.ndarray, emotion: np.ndarray, *,
          identity_net: nn.Module, emotion_net: nn.Module, mu: float, ssim_weight: float, batch_size: int,
          device: torch.device, precision: str = "fp32") -> dict:
    """All metrics of DESIGN section 6 for one judge pair (an identity and an emotion classifier)."""
    kw = dict(batch_size=batch_size, device=device, precision=precision)
    return compute_metrics(
        identity_probs_orig=class_probabilities(identity_net, original, **kw),
        identity_probs_deid=class_probabilities(identity_net, deidentified, **kw),
        emotion_probs_orig=class_probabilities(emotion_net, original, **kw),
        emotion_probs_deid=class_probabilities(emotion_net, deidentified, **kw),
        identity=torch.from_numpy(identity), emotion=torch.from_numpy(emotion),
        ssim_per_image=ssim_values(original, deidentified, batch_size), mu=mu, ssim_weight=ssim_weight,
    )
