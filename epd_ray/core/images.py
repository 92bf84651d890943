"""Image tensor conventions shared by every network, loss, metric and baseline.

Storage (Parquet shards, files on disk) holds uint8 pixels in NHWC order; every network sees float
tensors in NCHW order with values in [-1, 1] (pix2pix's convention, matching the generator's tanh).
SSIM and anything "photometric" works in [0, 1]. These four functions are the only place where the
conversions are written down, so that no stage gets the scaling subtly wrong.
"""

from __future__ import annotations

import numpy as np
import torch

# ITU-R BT.601 luma weights: what PIL's "L" mode and OpenCV's RGB2GRAY use, and what FER-2013-style
# grey faces were made with. They sum to 1, so a grey image of a [-1, 1] image stays in [-1, 1].
LUMA_601 = (0.299, 0.587, 0.114)


def to_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels NHWC (or one HWC image) -> float32 NCHW in [-1, 1].

    A 3-d input is taken as a single HWC image and gets a batch dimension of 1.
    """
    t = torch.as_tensor(pixels)
    if t.dtype != torch.uint8:
        raise ValueError(f"to_tensor expects uint8 pixels, got dtype {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"to_tensor expects NHWC (or HWC) pixels, got shape {tuple(t.shape)}")
    t = t.permute(0, 3, 1, 2).to(torch.float32).contiguous()
    return t.div_(127.5).sub_(1.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 numpy NHWC (values clamped, rounded to nearest)."""
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"to_uint8 expects NCHW (or CHW) tensors, got shape {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.float32)
    t = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5).round_()
    return t.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_unit(t: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (what SSIM and image files use)."""
    return (t + 1.0) * 0.5


def to_grey(t: torch.Tensor) -> torch.Tensor:
    """RGB N3HW -> grey N1HW with ITU-R 601 luma; a 1-channel input is returned unchanged.

    Works in any value range because the weights sum to 1 (so [-1, 1] stays [-1, 1]).
    """
    if t.ndim != 4:
        raise ValueError(f"to_grey expects NCHW tensors, got shape {tuple(t.shape)}")
    channels = t.shape[1]
    if channels == 1:
        return t
    if channels != 3:
        raise ValueError(f"to_grey expects 1 or 3 channels, got {channels}")
    r, g, b = t[:, 0:1], t[:, 1:2], t[:, 2:3]
    return LUMA_601[0] * r + LUMA_601[1] * g + LUMA_601[2] * b


GREY_TOLERANCE = 2 / 127.5  # channels within 2 of 255 levels of each other: a grey photograph (JPEG rounding)


def keep_grey(source: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """`image` (N3HW), with each face whose `source` is grey (its three channels equal, within
    GREY_TOLERANCE) replaced by its luma in all three channels; colour faces unchanged.

    A generator trained on colour and grey photographs draws some colour into grey faces (speckle a viewer
    sees at once); a grey photograph de-identified must stay grey."""
    grey = (source.amax(1) - source.amin(1)).flatten(1).amax(1) <= GREY_TOLERANCE
    return torch.where(grey[:, None, None, None], to_grey(image).expand_as(image), image)
