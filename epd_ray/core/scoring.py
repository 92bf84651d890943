"""Run a de-identification method and a classifier over a split, batch by batch, as judges need them.

Images are judged as they would be published: quantised to 8 bits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from epd_ray.core.images import to_tensor, to_uint8
from epd_ray.core.losses import ssim_per_image
from epd_ray.core.precision import autocast

Method = Callable[[torch.Tensor], torch.Tensor]


class GeneratorMethod:
    """The generator as published (a `BestOfDraws`, or the bare generator): eval mode, its dropout noise z
    still on, drawn from a stream of its own.

    Each call (one batch) reseeds the RNG from that stream inside `fork_rng`, so the images depend on the
    seed and the batches alone, not on what else ran first (methods, order, other evaluations, training
    steps), and the caller's RNG is left as it was: a GAN run's validation rounds draw every face's z alike
    (rounds differ by the model, not by the draws' luck) and leave its training noise untouched. Called again
    on the same faces it draws anew, as an attacker who runs the published model several times does
    (`evaluation.parrot_draws`); the baselines, plain functions, give the same faces every time.
    """

    def __init__(self, generator: nn.Module, seed: int) -> None:
        self.generator = generator.eval()
        self.stream = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=self.stream)))
            return self.generator(x)


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
def class_logits(net: nn.Module, pixels: np.ndarray, *, batch_size: int, device: torch.device,
                 precision: str = "fp32") -> torch.Tensor:
    net.eval()
    logits = []
    for start in range(0, len(pixels), batch_size):
        x = to_tensor(pixels[start:start + batch_size]).to(device)
        with autocast(device, precision):
            logits.append(net(x).float().cpu())
    return torch.cat(logits)


def class_probabilities(net: nn.Module, pixels: np.ndarray, **kw) -> torch.Tensor:
    return torch.softmax(class_logits(net, pixels, **kw), dim=1)


@torch.no_grad()
def ssim_values(original: np.ndarray, deidentified: np.ndarray, batch_size: int) -> torch.Tensor:
    """SSIM of each de-identified image against its original, batch by batch."""
    return torch.cat([
        ssim_per_image(to_tensor(original[s:s + batch_size]), to_tensor(deidentified[s:s + batch_size]))
        for s in range(0, len(original), batch_size)
    ])
