"""Batched generator inference where every face carries its own noise seed.

pix2pix's noise z is the dropout kept on at inference (`NoiseDropout`). Drawing it from the global RNG
would make a face's output depend on which other faces share its batch, and would change a tracked
face in every video frame. Here each NoiseDropout's mask is drawn per sample from a `torch.Generator`
seeded with that face's seed, so a face's output depends on its pixels and its seed only: batch size,
batch neighbours and run order do not matter, and the same seed gives the same z across frames. A model of
several draws (core/draws.py) draws each face that many times, seeded from its seed and the draw's number,
and keeps for a seed the draw it chose the first time it saw that seed: a video track keeps one draw. A
generator told the expression (`model.expression_input`) is told what its tellers read in the face, averaged
over the seed's recent frames: a track's face follows the person's expression, not a frame's misreading.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch

from epd_ray.core.draws import BestOfDraws
from epd_ray.core.images import to_tensor, to_uint8
from epd_ray.core.networks import NoiseDropout, UNetGenerator
from epd_ray.core.precision import autocast, resolve_precision


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device}")
    return device


@contextlib.contextmanager
def seeded_noise(generator: UNetGenerator, seeds: Sequence[int]) -> Iterator[None]:
    """Within this context each sample i of the next forward pass gets dropout masks from seed seeds[i]."""
    drops = [m for m in generator.modules() if isinstance(m, NoiseDropout) and m.p > 0]
    rngs = [torch.Generator().manual_seed(int(s)) for s in seeds]
    saved = [m.deterministic for m in drops]

    def hook(module: NoiseDropout, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if x.shape[0] != len(rngs):
            raise ValueError(f"seeded_noise: batch of {x.shape[0]} faces but {len(rngs)} seeds")
        keep = torch.stack([torch.rand(x.shape[1:], generator=g) >= module.p for g in rngs])
        return x * keep.to(x.device, x.dtype) * (1.0 / (1.0 - module.p))

    handles = []
    try:
        for m in drops:
            m.deterministic = True  # the module passes x through; the hook applies the seeded mask
            handles.append(m.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, d in zip(drops, saved):
            m.deterministic = d


KEPT_DRAWS = 4096  # seeds whose draw FaceEngine remembers (the faces of recent frames; far more than tracks)
# The share of a seed's earlier reading of the expression in the one its next face is told: a one-frame
# misreading moves no track's expression; one read in two frames running does.
EXPRESSION_MEMORY = 0.7


def draw_seeds(seeds: Sequence[int], draw: int) -> list[int]:
    """The seeds of draw `draw` of each face: the face's own seed for the first, so one draw is what a single
    draw always was; a seed derived from (seed, draw) for the others."""
    if draw == 0:
        return [int(s) for s in seeds]
    return [int(np.random.SeedSequence([int(s), draw]).generate_state(1, np.uint64)[0] >> 1) for s in seeds]


class FaceEngine:
    """The de-identifier as a function of uint8 face crops (N, S, S, 3) and one seed per face: with more than
    one draw (`BestOfDraws`), each draw's noise is seeded from the face's seed and the draw's number, so a
    face's output still depends on its pixels and its seed only."""

    def __init__(self, model: BestOfDraws | UNetGenerator, device: str | torch.device = "auto",
                 precision: str = "fp32", batch_size: int = 16, noise: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
        model = model if isinstance(model, BestOfDraws) else BestOfDraws(model)
        self.model = model.to(self.device).eval()
        self.generator = self.model.generator
        self.batch_size = int(batch_size)
        self.noise = noise  # False: no dropout noise at all (deterministic generator, one draw)
        self.size = int(self.generator.config["image_size"])
        # seed -> the draw published for it: a video track (one seed) keeps the draw chosen at its first frame,
        # so its face does not switch between draws from frame to frame
        self._kept_draws: OrderedDict[int, int] = OrderedDict()
        # seed -> the tellers' probabilities of each expression (`BestOfDraws.read_original`), averaged over its
        # faces so far
        self._readings: OrderedDict[int, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def __call__(self, crops: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        if len(crops) == 0:
            return np.empty((0, self.size, self.size, 3), np.uint8)
        if crops.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected crops of shape (N, {self.size}, {self.size}, 3), got {crops.shape}")
        out = []
        for start in range(0, len(crops), self.batch_size):
            x = to_tensor(crops[start:start + self.batch_size]).to(self.device)
            batch_seeds = list(seeds[start:start + self.batch_size])
            reading = expression = None
            if self.model.reader is not None:  # the originals read once: for the expression told and the pick
                with autocast(self.device, self.precision):
                    reading = self.model.read_original(x)
            if self.generator.expressions:
                expression = torch.stack([self._tracked_reading(int(seed), probabilities)
                                          for seed, probabilities in zip(batch_seeds, reading)]).argmax(dim=1)
            drawn = []
            for draw in range(self.model.draws if self.noise else 1):
                noise = (seeded_noise(self.generator, draw_seeds(batch_seeds, draw)) if self.noise
                         else _deterministic(self.generator))
                with noise, autocast(self.device, self.precision):
                    drawn.append(self.model.draw(x, expression))
            drawn = torch.stack(drawn)
            with autocast(self.device, self.precision):
                picked = self.model.pick(x, drawn, reading).tolist()
            picked = [self._keep_draw(int(seed), draw) for seed, draw in zip(batch_seeds, picked)]
            out.append(to_uint8(drawn[picked, torch.arange(len(picked))].float()))
        return np.concatenate(out)

    def _keep_draw(self, seed: int, draw: int) -> int:
        """The draw for `seed`: the one kept for it, else `draw` (then kept)."""
        return _remember(self._kept_draws, seed, self._kept_draws.get(seed, draw))

    def _tracked_reading(self, seed: int, probabilities: torch.Tensor) -> torch.Tensor:
        """The expression probabilities `seed`'s face is told: this face's, averaged with the seed's earlier ones."""
        earlier = self._readings.get(seed)
        if earlier is not None:
            probabilities = EXPRESSION_MEMORY * earlier + (1 - EXPRESSION_MEMORY) * probabilities
        return _remember(self._readings, seed, probabilities)


def _remember(memory: OrderedDict, seed: int, value):
    """`value` stored for `seed` as its newest entry, the oldest of KEPT_DRAWS forgotten; returns `value`."""
    memory.pop(seed, None)
    memory[seed] = value
    if len(memory) > KEPT_DRAWS:
        memory.popitem(last=False)
    return value


@contextlib.contextmanager
def _deterministic(generator: UNetGenerator) -> Iterator[None]:
    saved = generator.deterministic
    generator.deterministic = True
    try:
        yield
    finally:
        generator.deterministic = saved
