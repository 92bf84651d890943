"""The published de-identifier: the generator, and the best of several draws of its noise z.

The generator's dropout noise z gives a different face at every draw, and on a small real set the draws
differ most in what the expression keeps: on JAFFE (64 px, 79 training faces) one draw kept 0.65 of the
test expressions the independent emotion evaluator S_e read in the originals, while 0.92-1.0 of the faces
had at least one of 8-32 draws that kept it. So, with `draws` > 1, each face is drawn that many times and
the draw published is the one the emotion verifier S (the network the generator's L_CE was trained
through; never a judge) reads most surely as the expression S reads in the original. No label is needed,
so it works on a user's unlabelled photographs; the judges then measure the draw published, as they
measure a single draw. With one draw (or no reader) this is the generator itself. Either way a grey
photograph gives a grey face (`images.keep_grey`): every draw is made grey before S reads it.

S reads each image as the mean of its probabilities over the image, its mirror and four small shifts
(`reader_views`). Picking the maximum of K noisy scores favours the draw whose score is most overstated
(S's quirks, not the expression); averaging views damps that. On JAFFE (67 validation and 67 test faces,
32 draws, kept by S_e averaged over 40 random subsets of draws) S alone kept 0.74-0.77 at 8-32 draws and
did not improve past 8; read over the six views it kept 0.75-0.78 at 8, 0.79-0.81 at 16 and 0.83-0.84
at 32 draws (one draw: 0.65), at the same dlib rank-1.
"""

from __future__ import annotations

import torch
from torch import nn

from epd_ray.core.images import keep_grey
from epd_ray.core.networks import UNetGenerator


def reader_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The views S reads an image (N, C, H, W) in: itself, its mirror, and shifts of 1/32 of its width
    (2 px at 64) left, right, up and down."""
    shift = max(1, x.shape[-1] // 32)
    return [x, x.flip(-1), x.roll(shift, -1), x.roll(-shift, -1), x.roll(shift, -2), x.roll(-shift, -2)]


def pick_draws(original: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """(N,) index of the draw to publish per face: the draw whose probability of the reading of the original
    (argmax of `original`, (N, C) probabilities) is highest among `drawn` (K, N, C) probabilities."""
    reading = original.argmax(dim=1)
    faces = torch.arange(original.shape[0], device=original.device)
    return drawn[:, faces, reading].argmax(dim=0)


class BestOfDraws(nn.Module):
    """G(x, z) drawn `draws` times per face, the draw that keeps the expression best published (see the
    module docstring). `forward` draws z from torch's RNG, as the generator alone does; a caller that seeds
    each draw itself (deploy/engine.py) calls `draw` under its own noise, then `pick`."""

    def __init__(self, generator: UNetGenerator, reader: nn.Module | None = None, draws: int = 1):
        super().__init__()
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        if draws > 1 and reader is None:
            raise ValueError(f"{draws} draws need an expression reader to choose between them")
        self.generator, self.reader = generator, reader if draws > 1 else None
        self.draws = int(draws)

    @property
    def config(self) -> dict:
        return self.generator.config

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """One draw G(x, z) for the faces `x`, grey where `x` is grey."""
        return keep_grey(x, self.generator(x))

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) the reader's class probabilities for `x`, averaged over `reader_views`."""
        return torch.stack([torch.softmax(self.reader(v).float(), dim=1) for v in reader_views(x)]).mean(0)

    def pick(self, x: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """(N,) index of the draw to publish for each of the faces `x`, out of `drawn` (K, N, C, H, W)."""
        k, n = drawn.shape[:2]
        if self.reader is None or k == 1:
            return torch.zeros(n, dtype=torch.long, device=drawn.device)
        with torch.no_grad():
            return pick_draws(self.read(x), torch.stack([self.read(d.to(x.dtype)) for d in drawn]))

    def choose(self, x: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """The published face per input, out of `drawn` (K, N, C, H, W), the K draws for the faces `x`."""
        return drawn[self.pick(x, drawn), torch.arange(drawn.shape[1], device=drawn.device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.draws == 1:
            return self.draw(x)
        return self.choose(x, torch.stack([self.draw(x) for _ in range(self.draws)]))
