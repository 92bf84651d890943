"""Classical de-identification baselines, measured exactly like EPD-Net (`core/metrics.py`).

Same tensor convention as the networks: float NCHW images in [-1, 1] in, same shape, dtype and range
out. Every baseline is `fn(x, **params) -> x'`; k-Same-Pixel also needs the probes' identities and a
gallery (train faces with identities). `BASELINES` maps the names used in configs and reports to them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def no_change(x: torch.Tensor) -> torch.Tensor:
    """The identity "de-identification": x' = x. The floor every method must beat on privacy."""
    return x.clone()


def gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel covering +-3 sigma (99.7% of the mass)."""
    return 2 * math.ceil(3.0 * sigma) + 1


def gaussian_blur(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur with std `sigma` pixels (default: image side / 16, i.e. 2 px at 32 px).

    Kernel size 2 * ceil(3 sigma) + 1; borders replicate the edge pixels, so a flat image stays flat
    and the mean colour is kept. sigma <= 0 returns a copy of x.
    """
    _check_images(x)
    if sigma is None:
        sigma = min(x.shape[-2:]) / 16.0
    sigma = float(sigma)
    if sigma <= 0:
        return x.clone()
    size = gaussian_kernel_size(sigma)
    coords = torch.arange(size, dtype=torch.float32, device=x.device) - size // 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    h = x.float()
    pad = size // 2
    h = F.conv2d(F.pad(h, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, size).expand(c, 1, 1, size),
                 groups=c)
    h = F.conv2d(F.pad(h, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, size, 1).expand(c, 1, size, 1),
                 groups=c)
    return h.clamp(-1.0, 1.0).to(x.dtype)


def pixelate(x: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """Average over a blocks x blocks grid (area averaging), then nearest upsampling to the input size.

    When the side is a multiple of `blocks`, every cell of side/blocks pixels is one constant colour.
    """
    _check_images(x)
    blocks = int(blocks)
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks!r}")
    small = F.adaptive_avg_pool2d(x.float(), blocks)
    return F.interpolate(small, size=x.shape[-2:], mode="nearest").to(x.dtype)


def k_same_pixel(
    x: torch.Tensor,
    identity: torch.Tensor,
    gallery: torch.Tensor,
    gallery_identity: torch.Tensor,
    k: int = 10,
    chunk: int = 256,
) -> torch.Tensor:
    """k-Same-Pixel: replace each face with the pixel mean of its k nearest gallery faces of OTHER identities.

    Nearest = L2 distance in pixel space. Faces of the probe's own identity are excluded, so the output
    never averages in the person it hides (this package's variant; the original k-Same clusters the probe
    set itself). If fewer than k other-identity faces exist, all of them are used. Probes are processed
    in chunks of `chunk` to bound the (chunk x gallery) distance matrix.
    """
    _check_images(x)
    _check_images(gallery)
    if x.shape[1:] != gallery.shape[1:]:
        raise ValueError(f"probe and gallery image shapes differ: {tuple(x.shape[1:])} vs {tuple(gallery.shape[1:])}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    identity = torch.as_tensor(identity, device=x.device).long().reshape(-1)
    gallery_identity = torch.as_tensor(gallery_identity, device=x.device).long().reshape(-1)
    if identity.shape[0] != x.shape[0] or gallery_identity.shape[0] != gallery.shape[0]:
        raise ValueError("one identity label per probe and per gallery image is needed")
    g = gallery.to(x.device).float().flatten(1)
    outputs = []
    for start in range(0, x.shape[0], chunk):
        probe = x[start:start + chunk].float().flatten(1)
        ids = identity[start:start + chunk]
        dist = torch.cdist(probe, g)  # (n, G)
        same = ids[:, None] == gallery_identity[None, :]
        available = (~same).sum(dim=1)
        if bool((available == 0).any()):
            raise ValueError("k_same_pixel: some probe has no gallery face of another identity")
        dist = dist.masked_fill(same, float("inf"))
        kk = min(k, g.shape[0])
        nearest = dist.topk(kk, dim=1, largest=False).indices  # (n, kk), own identity sorted last
        # With fewer than k other-identity faces, topk would reach into masked ones: weight those 0.
        valid = torch.arange(kk, device=x.device)[None, :] < available[:, None]
        weights = valid.float() / valid.float().sum(dim=1, keepdim=True)
        mean = torch.zeros_like(probe)
        for j in range(kk):  # one (n, pixels) slice at a time: g[nearest] whole could be gigabytes
            mean += weights[:, j:j + 1] * g[nearest[:, j]]
        outputs.append(mean)
    out = torch.cat(outputs).view_as(x)
    return out.clamp(-1.0, 1.0).to(x.dtype)


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"expected a float NCHW tensor, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float tensor in [-1, 1], got dtype {x.dtype} (use images.to_tensor)")


BASELINES: dict[str, Callable[..., torch.Tensor]] = {
    "identity": no_change,
    "blur": gaussian_blur,
    "pixelate": pixelate,
    "ksame": k_same_pixel,
}
