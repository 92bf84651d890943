"""One EPD-Net G+D update against a plain PyTorch pix2pix update, at the same size, batch and precision.

    python -m benchmarks.train_step                          # --quick: 64/128/256 px, batch 4, about 3 min on 2 cores
    python -m benchmarks.train_step --bf16                   # bf16 rounds too where bf16 is emulated (slow)
    python -m benchmarks.train_step --full                   # batch 8, more steps (longer)
    python -m benchmarks.train_step --sizes 128 --batch 8 --precisions bf16

EPD-Net step: what `epd_ray.train.gan.gan_loop` does per batch, with the package's own pieces (`build_gan`,
`frozen`, `discriminator_loss`, `generator_loss`, `autocast`, channels_last): a D step on (x, y_real) against
(x, G(x).detach()), then a G step on L_G through D and the frozen verifiers V (VGG-16, width 1 and 67
identities as in the paper, unless told otherwise) and S (mini-Xception). U-Net ngf 64, PatchGAN ndf 64,
3 layers, batch norm, Adam.

Reference: the pix2pix repository's step written here from torch.nn (nothing from epd_ray): U-Net built from
UnetSkipConnectionBlock with its defaults (ngf 64, batch norm, dropout), NLayerDiscriminator (ndf 64,
n_layers 3), normal(0, 0.02) initialisation, Adam(2e-4, betas 0.5/0.999), vanilla GAN loss
(BCEWithLogits) + 100 * L1, D frozen (requires_grad False) during the G step as `optimize_parameters` does.
The same autocast precision and memory format as the EPD-Net step.

Decomposition of the EPD-Net step, all measured in the same rounds as the full step:
- "G+D part": the same step with L_G = lambda1 (L_adv + phi L_ssim) only (no V, no S);
- V and S alone: forward + backward to their input (their weights are frozen) on G's output, with the
  contrastive and cross-entropy losses, as inside the step.
- "+diversity": the full step with `loss.diversity` 0.5 (not in the paper; the `faces` preset's), which draws
  each face of the batch twice.
- "+views": the full step with `train.verifier_views` (not in the paper; the `faces` preset's), V and S reading
  a randomly transformed view of G's output.
- "+3 S": the full step with `verifiers.emotion_verifiers` 3 (not in the paper; the `faces` preset's), L_CE
  through the mean probability of three mini-Xceptions.
- "+median": the full step with `model.median_output` (not in the paper; the `faces` preset's), G's output
  through a 3x3 median that every loss reads and the backward pass goes through.
The verifiers' share is (full - G+D part) / full; V + S alone is printed beside it as a check.

Timing: every variant of one (size, precision) runs once per round, round after round (so a burst of load
from other jobs hits all of them alike; the order rotates from round to round), after two untimed rounds; the
figure is the median. FLOPs are
counted with torch.utils.flop_counter.FlopCounterMode on one step (matmuls and convolutions, forward and
backward: norms, activations, pooling and the optimiser are not counted) and divided by the median time,
then compared with the matmul peak measured by benchmarks/machine.py in the same precision. Memory: on the
CPU the peak resident set size during one step above the resident size just before it (the high-water
mark is reset through /proc/self/clear_refs, the heap trimmed first), i.e. activations, saved tensors,
gradients and workspace; weights and Adam state are resident before and not in it. On CUDA:
torch.cuda.max_memory_allocated above the allocation before the step.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import machine  # noqa: E402
from epd_ray.config import load_config  # noqa: E402
from epd_ray.core.labels import NUM_EMOTIONS  # noqa: E402
from epd_ray.core.losses import (LossWeights, adversarial_loss, contrastive_identity_loss,  # noqa: E402
                                 emotion_loss, ssim_loss)
from epd_ray.core.networks import EmotionVerifier, ExpressionReaders, IdentityVerifier, count_parameters  # noqa: E402
from epd_ray.core.precision import autocast  # noqa: E402
from epd_ray.train.gan import GanSteps, build_gan, frozen  # noqa: E402
from epd_ray.train.worker import WorkerSetup, prepare_images  # noqa: E402

# --------------------------------------------------------------------------------------------------
# The reference: pix2pix (junyanz/pytorch-CycleGAN-and-pix2pix, models/networks.py), written plainly
# --------------------------------------------------------------------------------------------------


class UnetSkipConnectionBlock(nn.Module):
    """pix2pix's U-Net block: X -> downsampling -> submodule -> upsampling -> cat([X, .])."""

    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False, innermost=False,
                 norm_layer=nn.BatchNorm2d, use_dropout=False):
        super().__init__()
        self.outermost = outermost
        use_bias = norm_layer == nn.InstanceNorm2d
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = norm_layer(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = norm_layer(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            down = [downconv]
            up = [uprelu, upconv, nn.Tanh()]
            model = down + [submodule] + up
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            down = [downrelu, downconv]
            up = [uprelu, upconv, upnorm]
            model = down + up
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            down = [downrelu, downconv, downnorm]
            up = [uprelu, upconv, upnorm]
            model = down + [submodule] + up + ([nn.Dropout(0.5)] if use_dropout else [])
        self.model = nn.Sequential(*model)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix's `unet_256` generalised: num_downs = log2(image side) (unet_128 is num_downs 7)."""

    def __init__(self, input_nc, output_nc, num_downs, ngf=64, norm_layer=nn.BatchNorm2d, use_dropout=False):
        super().__init__()
        unet_block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, input_nc=None, submodule=None,
                                             norm_layer=norm_layer, innermost=True)
        for _ in range(num_downs - 5):
            unet_block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, input_nc=None, submodule=unet_block,
                                                 norm_layer=norm_layer, use_dropout=use_dropout)
        unet_block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, input_nc=None, submodule=unet_block,
                                             norm_layer=norm_layer)
        unet_block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, input_nc=None, submodule=unet_block,
                                             norm_layer=norm_layer)
        unet_block = UnetSkipConnectionBlock(ngf, ngf * 2, input_nc=None, submodule=unet_block, norm_layer=norm_layer)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=unet_block,
                                             outermost=True, norm_layer=norm_layer)

    def forward(self, input):
        return self.model(input)


class NLayerDiscriminator(nn.Module):
    """pix2pix's PatchGAN discriminator (`basic` is n_layers 3: 70x70 patches)."""

    def __init__(self, input_nc, ndf=64, n_layers=3, norm_layer=nn.BatchNorm2d):
        super().__init__()
        use_bias = norm_layer == nn.InstanceNorm2d
        kw, padw = 4, 1
        sequence = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            sequence += [nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw,
                                   bias=use_bias),
                         norm_layer(ndf * nf_mult), nn.LeakyReLU(0.2, True)]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        sequence += [nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw,
                               bias=use_bias),
                     norm_layer(ndf * nf_mult), nn.LeakyReLU(0.2, True)]
        sequence += [nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.model = nn.Sequential(*sequence)

    def forward(self, input):
        return self.model(input)


def pix2pix_init(net: nn.Module, init_gain: float = 0.02) -> nn.Module:
    """pix2pix `init_weights(init_type='normal')`."""

    def init_func(m):
        classname = m.__class__.__name__
        if hasattr(m, "weight") and (classname.find("Conv") != -1 or classname.find("Linear") != -1):
            nn.init.normal_(m.weight.data, 0.0, init_gain)
            if hasattr(m, "bias") and m.bias is not None:
                nn.init.constant_(m.bias.data, 0.0)
        elif classname.find("BatchNorm2d") != -1:
            nn.init.normal_(m.weight.data, 1.0, init_gain)
            nn.init.constant_(m.bias.data, 0.0)

    net.apply(init_func)
    return net


class GANLoss(nn.Module):
    """pix2pix's GANLoss with gan_mode 'vanilla': BCE-with-logits against a label map of the prediction's shape."""

    def __init__(self):
        super().__init__()
        self.register_buffer("real_label", torch.tensor(1.0))
        self.register_buffer("fake_label", torch.tensor(0.0))
        self.loss = nn.BCEWithLogitsLoss()

    def __call__(self, prediction, target_is_real):
        target = (self.real_label if target_is_real else self.fake_label).expand_as(prediction)
        return self.loss(prediction, target.to(prediction.dtype))


class Pix2PixStep:
    """pix2pix's `optimize_parameters` with its defaults (lambda_L1 100, lr 2e-4, beta1 0.5)."""

    def __init__(self, size: int, ngf: int, ndf: int, device: torch.device, precision: str, channels_last: bool):
        self.device, self.precision = device, precision
        num_downs = int(math.log2(size))
        self.netG = pix2pix_init(UnetGenerator(3, 3, num_downs, ngf, nn.BatchNorm2d, use_dropout=True)).to(device)
        self.netD = pix2pix_init(NLayerDiscriminator(6, ndf, n_layers=3, norm_layer=nn.BatchNorm2d)).to(device)
        if channels_last:
            self.netG.to(memory_format=torch.channels_last)
            self.netD.to(memory_format=torch.channels_last)
        self.criterionGAN = GANLoss().to(device)
        self.criterionL1 = nn.L1Loss()
        self.lambda_L1 = 100.0
        self.optimizer_G = torch.optim.Adam(self.netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.optimizer_D = torch.optim.Adam(self.netD.parameters(), lr=2e-4, betas=(0.5, 0.999))

    @staticmethod
    def set_requires_grad(net: nn.Module, requires_grad: bool) -> None:
        for param in net.parameters():
            param.requires_grad = requires_grad

    def __call__(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        with autocast(self.device, self.precision):
            fake_B = self.netG(real_A)
        # update D
        self.set_requires_grad(self.netD, True)
        self.optimizer_D.zero_grad()
        with autocast(self.device, self.precision):
            fake_AB = torch.cat((real_A, fake_B), 1)
            loss_D_fake = self.criterionGAN(self.netD(fake_AB.detach()), False)
            real_AB = torch.cat((real_A, real_B), 1)
            loss_D_real = self.criterionGAN(self.netD(real_AB), True)
            loss_D = (loss_D_fake + loss_D_real) * 0.5
        loss_D.backward()
        self.optimizer_D.step()
        # update G
        self.set_requires_grad(self.netD, False)
        self.optimizer_G.zero_grad()
        with autocast(self.device, self.precision):
            loss_G_GAN = self.criterionGAN(self.netD(fake_AB), True)
            loss_G_L1 = self.criterionL1(fake_B, real_B) * self.lambda_L1
            loss_G = loss_G_GAN + loss_G_L1
        loss_G.backward()
        self.optimizer_G.step()


# --------------------------------------------------------------------------------------------------
# The EPD-Net step: gan_loop's per-batch body, with the package's own pieces
# --------------------------------------------------------------------------------------------------


class EpdStep:
    """One batch of `gan_loop`: D step, then G step through D, V and S (or through D alone: `verifiers=False`)."""

    def __init__(self, size: int, ngf: int, ndf: int, setup: WorkerSetup, identities: int, verifier_width: float,
                 diversity: float = 0.0, verifier_views: bool = False, emotion_verifiers: int = 1,
                 median_output: bool = False):
        exp = load_config("quick", {"model.ngf": ngf, "model.ndf": ndf, "model.n_layers": 3, "model.norm": "batch",
                                    "model.dropout": 0.5, "model.median_output": median_output})
        self.setup = setup
        self.weights = LossWeights(diversity=diversity)  # the paper's point: lambdas 1, phi 0.25, alpha 1
        generator, discriminator = build_gan(exp, size, NUM_EMOTIONS)
        for module in (generator, discriminator):
            module.to(setup.device)
            if setup.channels_last:
                module.to(memory_format=torch.channels_last)
        self.generator, self.discriminator = generator, discriminator
        self.identity_verifier = frozen(IdentityVerifier(identities, size, verifier_width), setup)
        self.emotion_verifier = frozen(EmotionVerifier() if emotion_verifiers == 1 else ExpressionReaders(
            [{"kind": "emotion_verifier", "config": {}}] * emotion_verifiers), setup)
        betas = (exp.train.beta1, exp.train.beta2)
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=exp.train.lr, betas=betas)
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=exp.train.lr, betas=betas)
        self.steps = GanSteps(generator, discriminator, self.identity_verifier, self.emotion_verifier, self.opt_g,
                              self.opt_d, self.weights, setup, ema_decay=0.999, verifier_views=verifier_views)

    def __call__(self, x, y_real, identity, emotion, verifiers: bool = True) -> None:
        if verifiers:  # exactly gan_loop's step
            self.steps.step(x, y_real, identity, emotion)
            return
        # The G+D part alone: gan_loop's step without the verifiers' terms of L_G (D frozen the same way).
        setup, weights = self.setup, self.weights
        fake, _ = self.steps.discriminator_step(x, y_real, emotion)
        critic = self.discriminator.requires_grad_(False)
        with autocast(setup.device, setup.precision):
            loss_g = weights.lambda1 * (adversarial_loss(critic(x, fake)) + weights.phi * ssim_loss(x, fake))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        critic.requires_grad_(True)

    def fake_for_verifiers(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.setup.device, self.setup.precision):
            return self.generator(x).detach()

    def identity_part(self, fake: torch.Tensor, identity: torch.Tensor) -> None:
        """V forward + backward to its input: the lambda2 L_contrastive branch of the G step."""
        inp = fake.detach().requires_grad_(True)
        with autocast(self.setup.device, self.setup.precision):
            loss = self.weights.lambda2 * contrastive_identity_loss(self.identity_verifier(inp), identity,
                                                                    self.weights.alpha)
        loss.backward()  # into inp.grad, dropped with inp

    def emotion_part(self, fake: torch.Tensor, emotion: torch.Tensor) -> None:
        """S forward + backward to its input: the lambda3 L_CE branch of the G step."""
        inp = fake.detach().requires_grad_(True)
        with autocast(self.setup.device, self.setup.precision):
            loss = self.weights.lambda3 * emotion_loss(self.emotion_verifier(inp), emotion)
        loss.backward()  # into inp.grad, dropped with inp


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------

_LIBC = None


def _trim_heap() -> None:
    global _LIBC
    gc.collect()
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def step_memory(fn: Callable[[], None], device: torch.device) -> tuple[float, bool]:
    """MiB the step needs above what is resident (CPU) or allocated (CUDA) before it; exact: peak was reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, True
    _trim_heap()
    exact = _reset_peak_rss()
    before = _rss_kib() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(0, peak - before) / 1024, exact


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def count_flops(fn: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class Variant:
    name: str
    fn: Callable[[], None]
    params: int = 0
    flops: int = 0
    memory_mib: float = float("nan")
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def spread(self) -> float:
        """Half the inter-quartile range relative to the median (a rough +/-)."""
        if len(self.times) < 4:
            return (max(self.times) - min(self.times)) / 2 / self.median if self.times else float("nan")
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) / 2 / self.median


def per_round(a: Variant, b: Variant, fn=lambda x, y: x / y) -> float:
    """Median over rounds of fn(a_i, b_i): each pair ran in the same round, under about the same load."""
    return statistics.median(fn(x, y) for x, y in zip(a.times, b.times))


@dataclass
class Measured:
    size: int
    precision: str
    batch: int
    variants: dict[str, Variant]
    rounds: int
    load: float
    memory_exact: bool


def make_batch(size: int, batch: int, identities: int, setup: WorkerSetup, seed: int):
    rng = np.random.default_rng(seed)
    x = prepare_images(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), setup)
    y = prepare_images(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), setup)
    identity = torch.from_numpy(rng.integers(0, identities, batch)).to(setup.device)
    emotion = torch.from_numpy(rng.integers(0, 7, batch)).to(setup.device)
    return x, y, identity, emotion


def measure(size: int, precision: str, args: argparse.Namespace, device: torch.device,
            flops_known: dict[tuple[int, str], int]) -> Measured:
    torch.manual_seed(0)
    setup = WorkerSetup(rank=0, world_size=1, device=device, precision=precision, channels_last=args.channels_last)
    x, y, identity, emotion = make_batch(size, args.batch, args.identities, setup, seed=size)
    reference = Pix2PixStep(size, args.ngf, args.ndf, device, precision, args.channels_last)
    epd = EpdStep(size, args.ngf, args.ndf, setup, args.identities, args.verifier_width)
    diverse = EpdStep(size, args.ngf, args.ndf, setup, args.identities, args.verifier_width, diversity=0.5)
    viewed = EpdStep(size, args.ngf, args.ndf, setup, args.identities, args.verifier_width, verifier_views=True)
    three_s = EpdStep(size, args.ngf, args.ndf, setup, args.identities, args.verifier_width, emotion_verifiers=3)
    median_step = EpdStep(size, args.ngf, args.ndf, setup, args.identities, args.verifier_width, median_output=True)
    fake = epd.fake_for_verifiers(x)
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(machine.DTYPES[precision]) for _ in range(2))
    product = torch.empty_like(a)
    variants = {
        "reference": Variant("reference", lambda: reference(x, y),
                             count_parameters(reference.netG) + count_parameters(reference.netD)),
        "epd": Variant("epd", lambda: epd(x, y, identity, emotion),
                       count_parameters(epd.generator) + count_parameters(epd.discriminator)),
        "epd_diversity": Variant("epd_diversity", lambda: diverse(x, y, identity, emotion),
                                 count_parameters(diverse.generator) + count_parameters(diverse.discriminator)),
        "epd_views": Variant("epd_views", lambda: viewed(x, y, identity, emotion),
                             count_parameters(viewed.generator) + count_parameters(viewed.discriminator)),
        "epd_3s": Variant("epd_3s", lambda: three_s(x, y, identity, emotion),
                          count_parameters(three_s.generator) + count_parameters(three_s.discriminator)),
        "epd_median": Variant("epd_median", lambda: median_step(x, y, identity, emotion),
                              count_parameters(median_step.generator)
                              + count_parameters(median_step.discriminator)),
        "epd_gd": Variant("epd_gd", lambda: epd(x, y, identity, emotion, verifiers=False),
                          count_parameters(epd.generator) + count_parameters(epd.discriminator)),
        "V": Variant("V", lambda: epd.identity_part(fake, identity), count_parameters(epd.identity_verifier)),
        "S": Variant("S", lambda: epd.emotion_part(fake, emotion), count_parameters(epd.emotion_verifier)),
        # The ceiling under the same load as the steps: one square matmul per round.
        "matmul": Variant("matmul", lambda: torch.mm(a, b, out=product), 0, 2 * n**3),
    }
    # Untimed round 1: FLOP count (the same ops in every precision, so once per size) or a plain warm-up.
    for v in variants.values():
        key = (size, v.name)
        if v.flops:  # known analytically
            v.fn()
        elif key not in flops_known:
            flops_known[key] = count_flops(v.fn)
        else:
            v.fn()
        v.flops = v.flops or flops_known[key]
    # Untimed round 2: memory of one step (optimiser state exists by now, as in training).
    exact = True
    for v in variants.values():
        if v.name != "matmul":
            v.memory_mib, ok = step_memory(v.fn, device)
            exact = exact and ok
    # Timed rounds.
    rounds, start = 0, time.perf_counter()
    order = list(variants.values())
    while rounds < args.min_rounds or (time.perf_counter() - start < args.budget and rounds < args.max_rounds):
        shift = rounds % len(order)  # rotate, so no variant always runs right after the same one
        for v in order[shift:] + order[:shift]:
            v.times.append(timed(v.fn, device))
        rounds += 1
    return Measured(size, precision, args.batch, variants, rounds, machine.load_average()[0], exact)


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:,.1f}"


def print_tables(results: list[Measured], args: argparse.Namespace) -> None:
    print(f"\n1. time per step (ms, median of the timed rounds, +/- half the inter-quartile range), "
          f"batch {args.batch}.")
    print("   Ratios are medians of per-round ratios (both steps ran in each round). G+D part: the EPD-Net step")
    print("   without V and S in L_G. Verifiers' share: (EPD-Net - G+D part) / EPD-Net; V+S alone: their forward +")
    print("   backward timed on their own, over the EPD-Net step. +diversity: the step with loss.diversity > 0 (each")
    print("   face drawn twice), over the EPD-Net step; +views: the step with train.verifier_views, over it; +3 S:")
    print("   the step with verifiers.emotion_verifiers 3, over it; +median: the step with model.median_output, over")
    print("   it.")
    head = (f"{'px':>4} {'prec':>5} {'rounds':>6} {'pix2pix ref':>14} {'EPD-Net':>14} {'EPD/ref':>8} "
            f"{'+diversity':>10} {'div/EPD':>7} {'+views':>8} {'views/EPD':>9} {'+3 S':>6} {'3S/EPD':>6} "
            f"{'G+D part':>9} {'GD/ref':>7} "
            f"{'V f+b':>8} {'S f+b':>7} "
            f"{'verif. share':>13} {'V+S alone':>10} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        v = r.variants
        share = per_round(v["epd"], v["epd_gd"], lambda full, gd: (full - gd) / full)
        alone = statistics.median((a + b) / c for a, b, c in zip(v["V"].times, v["S"].times, v["epd"].times))
        print(f"{r.size:>4} {r.precision:>5} {r.rounds:>6} "
              f"{ms(v['reference'].median):>8} ±{v['reference'].spread * 100:>3.0f}% "
              f"{ms(v['epd'].median):>8} ±{v['epd'].spread * 100:>3.0f}% "
              f"{per_round(v['epd'], v['reference']):>7.2f}x {ms(v['epd_diversity'].median):>10} "
              f"{per_round(v['epd_diversity'], v['epd']):>6.2f}x {ms(v['epd_views'].median):>8} "
              f"{per_round(v['epd_views'], v['epd']):>8.2f}x {ms(v['epd_3s'].median):>6} "
              f"{per_round(v['epd_3s'], v['epd']):>5.2f}x {ms(v['epd_median'].median):>7} "
              f"{per_round(v['epd_median'], v['epd']):>6.2f}x {ms(v['epd_gd'].median):>9} "
              f"{per_round(v['epd_gd'], v['reference']):>6.2f}x {ms(v['V'].median):>8} {ms(v['S'].median):>7} "
              f"{share * 100:>12.0f}% {alone * 100:>9.0f}% {r.load:>5.1f}", flush=True)

    print("\n2. work per step, achieved FLOP/s and step memory. GFLOP counted by FlopCounterMode (convolutions and")
    print("   matmuls, forward and backward). '% mm' = achieved over the square-matmul rate measured in the same")
    print("   rounds, same precision (so other load affects both); the machine's best matmul rate is in the header.")
    print("   MiB: memory the step needs above what is resident before it"
          + ("" if all(r.memory_exact for r in results) else " ('~': peak not resettable, a lower bound)") + ".")
    head = (f"{'px':>4} {'prec':>5} {'ref GFLOP':>10} {'EPD GFLOP':>10} {'G+D GFLOP':>10} {'V+S GFLOP':>10} "
            f"{'mm GFLOP/s':>11} {'ref GFLOP/s':>12} {'% mm':>5} {'EPD GFLOP/s':>12} {'% mm':>5} "
            f"{'ref MiB':>8} {'EPD MiB':>8} {'G+D MiB':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        v = r.variants
        rate = {k: v[k].flops / v[k].median for k in v}
        mm = rate["matmul"]
        mark = "" if r.memory_exact else "~"
        print(f"{r.size:>4} {r.precision:>5} {v['reference'].flops / 1e9:>10.1f} {v['epd'].flops / 1e9:>10.1f} "
              f"{v['epd_gd'].flops / 1e9:>10.1f} {(v['V'].flops + v['S'].flops) / 1e9:>10.1f} {mm / 1e9:>11.0f} "
              f"{rate['reference'] / 1e9:>12.1f} {rate['reference'] / mm * 100:>4.0f}% "
              f"{rate['epd'] / 1e9:>12.1f} {rate['epd'] / mm * 100:>4.0f}% "
              f"{mark}{v['reference'].memory_mib:>7.0f} {mark}{v['epd'].memory_mib:>7.0f} "
              f"{mark}{v['epd_gd'].memory_mib:>7.0f}")

    by_key = {(r.size, r.precision): r for r in results}
    pairs = [(s, by_key[(s, "fp32")], by_key[(s, "bf16")]) for s in args.sizes
             if (s, "fp32") in by_key and (s, "bf16") in by_key]
    if pairs:
        print("\n3. bf16 autocast against fp32: time fp32 / time bf16 (above 1: bf16 is faster), medians of different")
        print("   runs, so other load weighs more here than in the ratios of table 1")
        head = (f"{'px':>4} {'pix2pix ref':>12} {'EPD-Net':>8} {'G+D part':>9} {'V f+b':>6} {'S f+b':>6} "
                f"{'matmul':>7}")
        print(head)
        print("-" * len(head))
        for size, f32, b16 in pairs:
            cells = [f32.variants[k].median / b16.variants[k].median
                     for k in ("reference", "epd", "epd_gd", "V", "S", "matmul")]
            print(f"{size:>4} {cells[0]:>11.2f}x {cells[1]:>7.2f}x {cells[2]:>8.2f}x {cells[3]:>5.2f}x "
                  f"{cells[4]:>5.2f}x {cells[5]:>6.2f}x")

    first = results[0].variants
    print(f"\nparameters at {results[0].size} px: pix2pix G+D {first['reference'].params:,}, EPD-Net G+D "
          f"{first['epd'].params:,} (trained); frozen V {first['V'].params:,}, S {first['S'].params:,}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", help="the default: batch 4, >= 3 timed rounds")
    mode.add_argument("--full", dest="full", action="store_true", help="batch 8, >= 10 timed rounds, 20 s each")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=None, help="default 4 (--quick) or 8 (--full)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="default both; bf16 only with bf16 hardware (AVX512-BF16, AMX, a GPU) or --bf16")
    parser.add_argument("--bf16", dest="force_bf16", action="store_true",
                        help="run the bf16 rounds even where bf16 is emulated (no AVX512-BF16/AMX): skipped "
                             "there by default, they take most of the time and measure only the emulation")
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--ndf", type=int, default=64)
    parser.add_argument("--verifier-width", type=float, default=1.0, help="VGG-16 width of V (paper: 1.0)")
    parser.add_argument("--identities", type=int, default=67, help="classes of V (paper: 67)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="NCHW for both steps (default: channels_last for both, as epd-ray trains)")
    parser.add_argument("--device", default=str(machine.default_device()))
    parser.add_argument("--min-rounds", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per size and precision")
    parser.set_defaults(full=False)
    args = parser.parse_args(argv)
    args.batch = args.batch or (8 if args.full else 4)
    args.min_rounds = args.min_rounds or (10 if args.full else 3)
    args.budget = args.budget if args.budget is not None else (20.0 if args.full else 2.0)
    args.max_rounds = 200
    device = torch.device(args.device)
    args.precisions, skipped = machine.runnable_precisions(args.precisions, device, args.force_bf16)

    started = time.perf_counter()
    print("train_step: one EPD-Net G+D update (V, S frozen in the loss) against a plain PyTorch pix2pix update")
    print(f"mode {'--full' if args.full else '--quick'}: sizes {args.sizes}, batch {args.batch}, ngf {args.ngf}, "
          f"ndf {args.ndf}, V = VGG-16 width {args.verifier_width} ({args.identities} identities), device {device}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, at least {args.min_rounds} timed rounds "
          f"after 2 untimed")
    machine.print_machine(device)
    if skipped:
        print(skipped, flush=True)
    if not args.precisions:
        return
    results: list[Measured] = []
    flops_known: dict[tuple[int, str], int] = {}
    for size in args.sizes:
        for precision in args.precisions:
            r = measure(size, precision, args, device, flops_known)
            results.append(r)
            print(f"  measured {size} px {precision}: pix2pix {ms(r.variants['reference'].median)} ms, "
                  f"EPD-Net {ms(r.variants['epd'].median)} ms ({r.rounds} rounds, load {r.load:.1f})", flush=True)
            del r
            _trim_heap()
    print_tables(results, args)
    print(f"\n{machine.load_line()}; benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
