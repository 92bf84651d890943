"""The published de-identifier: the generator, and the best of several draws of its noise z.

The generator's dropout noise z gives a different face at every draw, and on a small real set the draws
differ most in what the expression keeps: on JAFFE (64 px, 79 training faces) one draw kept 0.63-0.66 of
the expressions the independent emotion evaluator S_e read in the originals, while 0.94-1.0 of the faces
had at least one of 8-32 draws that kept it. So, with `draws` > 1, each face is drawn that many times and
the draw published is the one the expression readers (`networks.ExpressionReaders`) read most surely as
the expression they read in the original (for a generator told the expression, the one it is told: what its
tellers read there, below). No label is needed, so it works on a user's unlabelled photographs; the judges
then measure the draw published, as they measure a single draw. With one draw (or no reader) this is the
generator itself. Either way a grey photograph gives a grey face
(`images.keep_grey`): every draw is made grey before it is read.

The readers are the expression pickers (`verifiers.pickers`): emotion classifiers of S_e's shape and
seeds of their own that pretraining trains beside S and that no loss trains the generator against. Each
reads an image once; a draw's reading is the mean of their probabilities. Without pickers S reads, over
six views (`networks.reader_views`). S is a poor picker: the generator's L_CE was trained through it, so
it reads the expression into draws where it is gone, and the maximum of K such scores favours the draw S
overrates most (averaging views only damps that). On JAFFE (a model the `faces` preset tuned with 16
draws, 67 validation and 67 test faces, 32 seeded draws, kept by S_e averaged over 40 random subsets of
draws), val / test:

    draws  S over six views   2 pickers   3 pickers   S_e itself (oracle)
      16      0.82 / 0.81    0.85 / 0.84  0.85 / 0.85      0.96 / 0.98
      24      0.83 / 0.80    0.88 / 0.86  0.88 / 0.88      0.96 / 1.00
      32      0.82 / 0.78    0.90 / 0.88  0.89 / 0.89      0.97 / 1.00

`epd-ray evaluate` on the test split at 32 draws, two models the `faces` preset tuned (that one / one tuned
with 32 draws and 2 pickers):

    readers                kept (S_e)    kept (FER reader)  dlib rank-1   parrot        J
    S over six views       0.85 / 0.86   0.44 / 0.53        0.31 / 0.22   0.40 / 0.45   0.50 / 0.58
    2 pickers              0.91 / 0.89   0.53 / 0.50        0.24 / 0.21   0.46 / 0.49   0.59 / 0.61
    S + 2 pickers          0.94 / 0.94   0.47 / 0.50        0.27 / 0.27   0.49 / 0.49   0.59 / 0.59

The pickers share S_e's architecture (another seed), which may flatter their figures under S_e; S does not,
and adding it to them lifted S_e's figure most, but the draws that keep the expression best are nearer
the original, and by J (the objective the search maximises) S with the pickers did no better than the
pickers alone: a tune of the `faces` preset with S among the readers kept 0.95 of the test expressions
but let dlib name 0.31 (J 0.56). The pretrained FER-2013 reader, which no part of epd-ray trained, moves
little and within noise (67 faces). Pickers over six views kept 0.88 (the second model), and 48 draws
0.89: neither helped.

Whether a pick by S_e's shape flatters S_e, read by networks no pick used (a bare tune's model on JAFFE,
32 seeded draws, 67 val / 67 test faces; a second pretraining of other seeds gave another S_e and three
mini-Xceptions, S's shape, in no loss):

    pick                          S_e           another S_e   mini-Xception  FER reader
    one draw                      0.67 / 0.56   0.55 / 0.65   0.69 / 0.67    0.37 / 0.39
    the model's 2 pickers         0.83 / 0.83   0.82 / 0.87   0.74 / 0.88    0.41 / 0.55
    2 pickers of other seeds      0.86 / 0.77   0.77 / 0.82   0.70 / 0.83    0.33 / 0.39
    2 mini-Xceptions              0.81 / 0.74   0.76 / 0.81   0.82 / 0.78    0.41 / 0.42
    the 2 pickers + 2 mini-X.     0.81 / 0.83   0.89 / 0.87   0.82 / 0.85    0.48 / 0.55

Each kind's pick reads a little better to its own kind on validation and not on test: 67 faces cannot show
S_e flattered by its twins, and networks of either shape read most of the pick's gain over one draw.

The most surely read draw, not any draw read right: publishing the first draw the pickers read as the
original's expression (as random as the noise z, which a parrot attacker's gallery would share less)
kept 0.79-0.80 and named 0.43-0.45 by the parrot; the first read with probability >= 0.8 kept 0.88-0.91
and named 0.37-0.48.

Other rules, on 48 seeded draws per face of one model the `faces` preset trained (picks among 32 of them,
averaged over 20 random subsets; JAFFE val / test, 67 faces each), kept as S_e reads it:

    rule                                                  kept (S_e)    kept (FER reader)  dlib rank-1
    one draw                                              0.74 / 0.75   0.40 / 0.55        0.18 / 0.17
    the pickers' mean probability (this module)           0.90 / 0.90   0.34 / 0.55        0.16 / 0.13
    their geometric mean                                  0.89 / 0.91   0.36 / 0.54        0.14 / 0.14
    their minimum                                         0.90 / 0.90   0.34 / 0.53        0.16 / 0.13
    nearest to the original's probabilities (L2)          0.93 / 0.86   0.38 / 0.47        0.24 / 0.15
    nearest to the original's probabilities (KL)          0.91 / 0.83   0.35 / 0.52        0.19 / 0.15
    the pickers and the FER-2013 reader                   0.89 / 0.88   0.84 / 0.85        0.22 / 0.18
    the FER-2013 reader alone                             0.74 / 0.80   0.94 / 0.93        0.14 / 0.13

None beats the pickers' mean on both splits. The pretrained FER-2013 reader (`evaluate/expression_reader.py`,
a judge) reads only 0.45-0.48 of JAFFE's unchanged faces right, and the two kinds of reader pick different draws:
each raises only its own figure. On people the model never saw (a model trained on 7 of JAFFE's people,
read on the other 3 by an S_e pretrained on those 3), S_e kept 0.45 / 0.41 of one draw, 0.54 / 0.45 of the
pickers' pick, 0.50 / 0.41 with the reader among them and 0.39 / 0.26 of the reader's alone. So the reader
stays a judge and picks nothing.

Nor can a pick lower the parrot attack or the speckle. The last three rules below pick among the draws the
pickers read at least 0.9x as surely as their best (the bare tune's model above, 32 seeded draws; the train
split's picks are the parrot's gallery; val / test):

    rule                                                  kept (S_e)    dlib rank-1   parrot
    the pickers' mean probability (this module)           0.83 / 0.83   0.13 / 0.16   0.33 / 0.37
    one draw                                              0.67 / 0.56   0.13 / 0.16   0.27 / 0.33
    the draw V reads least as whom it reads in the original  0.83 / 0.83   0.15 / 0.15   0.36 / 0.28
    the draw V reads most as another person, drawn per face  0.80 / 0.75   0.13 / 0.18   0.28 / 0.37
    the least speckled draw                               0.80 / 0.76   0.12 / 0.18   0.37 / 0.36

A face's draws lie 0.38 apart in dlib's embedding: further than two photographs of one person (0.27), nearer
than two people (0.48). They are all about as speckled (7.8-8.7 grey levels of mean |grey - its 3x3 median|
against the originals' 3.8). The draws differ too little in whom they show, or in how clean they are, for a
pick to change either.

Nor do other ways of choosing (another bare tune's model, 32 seeded draws, val / test): the pickers
fine-tuned on the generator's draws of the train faces, with those faces' labels (half draws, half
originals, 100-600 steps), kept 0.79-0.84 / 0.80-0.88 as S_e reads it, against 0.83 / 0.89 as trained;
the draw whose brows, eyes and mouth (dlib's 68 landmarks, aligned to the original's) lie nearest the
original's kept 0.68 / 0.64, no more than one draw (0.65 / 0.64): at 64 px the landmarks do not tell which
draw keeps the expression. Publishing the mean of the 2-8 draws the pickers read most surely kept 0.84-0.86
of the expressions but let the parrot name 0.31-0.67 against 0.25: what the draws share, the mean keeps, and
part of that is the person's stand-in.

Where the pickers' pick loses the expression (that model, 48 fresh draws): they read the original as S_e
does on 66 of 66 val and 65 of 66 test faces, so the misses are draws they read as the original's
expression with probability ~1.0 while S_e reads another (their probabilities of it correlate 0.45-0.48
across a face's draws). Scores that do not saturate near 1.0 (the mean logit margin, the mean log-odds,
probabilities at temperature 4) kept 0.90 / 0.91-0.92 against the mean probability's 0.89 / 0.89: within
one face on val, so the rule stays. What did lift kept was a generator trained to keep expressions that
more networks read (`verifiers.emotion_verifiers`), and most, one told the expression to keep
(`model.expression_input`, README), which is told what is read in the original.

Told, the generator draws the expression it is told, right or wrong, and the pickers read fewest originals
right where it matters: people the data set lacks. So the expression told (and kept by the pick) is what every
emotion classifier pretrained for the generator reads in the original, S and its siblings with the pickers
(`checkpoints.expression_tellers`); S flatters draws, not originals. On JAFFE's people a pretraining on 7 of
them never saw (val / test, 20-21 faces each, `epd-ray evaluate --probes 0` with judges pretrained on them),
in two splits of the 10 (new: TM, UY, YM / KA, KR, NA): the five read 0.90 / 0.81 and 0.50 / 0.55 of the
originals right against the pickers' 0.67 / 0.67 and 0.50 / 0.45 (on people they learnt, alike: 0.94 / 1.00
both on all 10, 0.98 / 0.96 against 0.96 / 0.98 on the second split's 7). Of the faces told right, S_e kept
0.38-0.88; of those told wrong, 0.00-0.43. Yet the models kept about as many of the new people's expressions
either way: 0.62 / 0.68 and 0.40 / 0.62 told by the five, 0.62 / 0.63 and 0.40 / 0.62 told by the pickers.
Reading right is needed but not enough: the generator too learnt its expressions from 7 people, and more
people (or `--emotion-data`) remain what carries expressions to new ones.
"""

from __future__ import annotations

import torch
from torch import nn

from epd_ray.core.images import keep_grey
from epd_ray.core.networks import UNetGenerator


def pick_draws(original: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """(N,) index of the draw to publish per face: the draw whose probability of the reading of the original
    (argmax of `original`, (N, C) probabilities) is highest among `drawn` (K, N, C) probabilities."""
    reading = original.argmax(dim=1)
    faces = torch.arange(original.shape[0], device=original.device)
    return drawn[:, faces, reading].argmax(dim=0)


class BestOfDraws(nn.Module):
    """G(x, z) drawn `draws` times per face, the draw that keeps the expression best published (see the
    module docstring). A generator told the expression (`model.expression_input`) draws G(x, e, z) with e what
    the `teller` (default: the readers) reads in the original, so it needs the readers even for one draw, and
    its pick keeps the draw the readers read most surely as e. `forward` draws z from torch's RNG, as the
    generator alone does; a caller that seeds each draw itself (deploy/engine.py) reads the originals once
    (`read_original`), calls `draw` under its own noise, then `pick` with that reading."""

    def __init__(self, generator: UNetGenerator, reader: nn.Module | None = None, draws: int = 1,
                 teller: nn.Module | None = None):
        super().__init__()
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        if draws > 1 and reader is None:
            raise ValueError(f"{draws} draws need an expression reader to choose between them")
        if generator.expressions and reader is None:
            raise ValueError("a generator told the expression needs an expression reader to read it in the original")
        self.generator, self.reader = generator, reader if draws > 1 or generator.expressions else None
        self.teller = teller if generator.expressions else None
        self.draws = int(draws)

    @property
    def config(self) -> dict:
        return self.generator.config

    def with_draws(self, draws: int) -> "BestOfDraws":
        """The same de-identifier (its generator, readers and tellers) drawing `draws` times per face."""
        return BestOfDraws(self.generator, self.reader, draws, self.teller).train(self.training)

    def draw(self, x: torch.Tensor, expression: torch.Tensor | None = None) -> torch.Tensor:
        """One draw G(x, z) for the faces `x`, grey where `x` is grey; a generator told the expression is told
        `expression` (default: what `read_original` reads in `x`)."""
        if expression is None and self.generator.expressions:
            with torch.no_grad():
                expression = self.read_original(x).argmax(dim=1)
        return keep_grey(x, self.generator(x, expression))

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) the readers' class probabilities for `x`."""
        return torch.softmax(self.reader(x).float(), dim=1)

    def read_original(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) the class probabilities of the original faces `x`: the tellers' when there are, else the
        readers'. Their argmax is the expression a told generator is told and the one the pick keeps."""
        return torch.softmax(self.teller(x).float(), dim=1) if self.teller is not None else self.read(x)

    def pick(self, x: torch.Tensor, drawn: torch.Tensor, original: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) index of the draw to publish for each of the faces `x`, out of `drawn` (K, N, C, H, W);
        `original`: `read_original(x)`, when the caller has read it already (to tell the generator the expression)."""
        k, n = drawn.shape[:2]
        if self.reader is None or k == 1:
            return torch.zeros(n, dtype=torch.long, device=drawn.device)
        with torch.no_grad():
            original = self.read_original(x) if original is None else original
            return pick_draws(original, torch.stack([self.read(d.to(x.dtype)) for d in drawn]))

    def choose(self, x: torch.Tensor, drawn: torch.Tensor, original: torch.Tensor | None = None) -> torch.Tensor:
        """The published face per input, out of `drawn` (K, N, C, H, W), the K draws for the faces `x`."""
        return drawn[self.pick(x, drawn, original), torch.arange(drawn.shape[1], device=drawn.device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the originals read once: for the expression told and for the pick
            original = self.read_original(x) if self.reader is not None else None
        expression = original.argmax(dim=1) if self.generator.expressions else None
        if self.draws == 1:
            return self.draw(x, expression)
        return self.choose(x, torch.stack([self.draw(x, expression) for _ in range(self.draws)]), original)
