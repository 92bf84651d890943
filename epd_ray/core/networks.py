"""The networks of EPD-Net (the paper's section III) and the independent evaluators.

Conventions: every network takes float NCHW RGB images in [-1, 1] (see `images.py`). Networks that
work on grey faces (mini-Xception, the emotion evaluator) convert RGB to grey themselves, so callers never
have to know which network wants what.

Every class keeps the keyword arguments that rebuild it in `self.config` (a JSON-able dict). A checkpoint
stores `kind` + `config` + `state_dict`, and `build_network(kind, **config)` rebuilds the module before
loading the weights (nanoGPT's `model_args` pattern): no pickled classes, no code in checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from epd_ray.core.images import to_grey
from epd_ray.core.labels import NUM_EMOTIONS

NORMS = ("batch", "instance")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    """pix2pix's two choices: BatchNorm, or InstanceNorm without affine parameters or running stats."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """pix2pix initialisation: conv/linear weights ~ N(0, gain), norm scales ~ N(1, gain), biases 0.

    pix2pix (and DCGAN before it) found this small-variance init keeps G and D balanced at the start;
    the default PyTorch (Kaiming-uniform) init makes D win too early. Returns `module` for chaining.
    """

    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)

    module.apply(_init)
    return module


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _check_image_size(image_size: int, low: int = 32, high: int | None = 256) -> int:
    size = int(image_size)
    ok = size >= low and (high is None or size <= high) and size & (size - 1) == 0
    if not ok:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"image_size must be a power of two in {bound}, got {image_size!r}")
    return size


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


class NoiseDropout(nn.Module):
    """Dropout that stays on at inference: pix2pix's only source of the noise z.

    pix2pix feeds no explicit z; dropout in the decoder, kept on at test time, is the noise. So this
    drops when `self.training or not self.deterministic`. Set `deterministic = True` (on this module or
    on the generator, which propagates it) for repeatable outputs, e.g. a deployed de-identifier whose
    output must not change between runs on the same frame.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.deterministic = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.training or not self.deterministic
        return F.dropout(x, self.p, training=active) if self.p > 0 else x

    def extra_repr(self) -> str:
        return f"p={self.p}, deterministic={self.deterministic}"


class UNetGenerator(nn.Module):
    """pix2pix U-Net generator G(x, z) (the paper's section III).

    log2(image_size) stride-2 4x4 downsamplings take the image to 1x1 (8 at 256 px, 5 at 32 px); widths
    ngf * (1, 2, 4, 8, 8, ...) capped at 8 * ngf. As in pix2pix: encoder blocks are LeakyReLU(0.2)-Conv-Norm
    (the first has neither activation nor norm, the innermost no norm since it works on a 1x1 map), decoder
    blocks ReLU-ConvTranspose-Norm, skip connections concatenate the encoder's pre-activation features, and
    the output is tanh in [-1, 1].

    `median_output` passes that output through a 3x3 median (per channel, edges reflected), in training as
    in publication, so the losses judge the face that is published. Not in the paper: steered by the
    verifiers alone, the generator partly hides people in a fine speckle (8 grey levels of mean |grey - its
    3x3 median| on JAFFE, the originals 3.8) that the median takes out (README, "What those faces look like").

    `expressions` > 0 makes it G(x, e, z): it is told the expression e to keep, as that many one-hot channels
    (+-1, the same at every pixel) beside x. Not in the paper: on a small real set the generator otherwise
    learns each person's expressions from their pixels, and loses them as it changes the person; told the
    expression, it draws one for all people alike. The GAN learns from the labels, deployment from what the
    tellers read in the original (core/draws.py), so no label is needed there.

    Noise z: `NoiseDropout(dropout)` after the decoder blocks right outside the innermost one, up to three
    of them (pix2pix's three 8*ngf up-blocks at 256 px, i.e. the 2->4, 4->8 and 8->16 px levels), but never
    in the two finest decoder blocks, so at 32 px two blocks (2->4, 4->8 px) carry it, at >= 64 px three.
    """

    def __init__(
        self,
        image_size: int,
        ngf: int = 64,
        norm: str = "batch",
        dropout: float = 0.5,
        in_channels: int = 3,
        out_channels: int = 3,
        median_output: bool = False,
        expressions: int = 0,
    ):
        super().__init__()
        image_size = _check_image_size(image_size)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if ngf < 1:
            raise ValueError(f"ngf must be >= 1, got {ngf!r}")
        self.config: dict[str, Any] = dict(
            image_size=image_size, ngf=int(ngf), norm=norm, dropout=float(dropout),
            in_channels=int(in_channels), out_channels=int(out_channels),
        )
        if median_output:  # the config of generators from before the option stays as it was
            self.config["median_output"] = True
        self.median_output = bool(median_output)
        if expressions < 0:
            raise ValueError(f"expressions must be >= 0, got {expressions!r}")
        if expressions:  # likewise
            self.config["expressions"] = int(expressions)
        self.expressions = int(expressions)
        depth = int(math.log2(image_size))
        self.depth = depth
        widths = [ngf * min(2**i, 8) for i in range(depth)]
        bias = norm == "instance"  # BatchNorm's shift makes a conv bias redundant (pix2pix)

        self.downs = nn.ModuleList()
        for i in range(depth):
            cin = in_channels + self.expressions if i == 0 else widths[i - 1]
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.LeakyReLU(0.2, inplace=False))
            has_norm = 0 < i < depth - 1
            layers.append(nn.Conv2d(cin, widths[i], 4, 2, 1, bias=bias or not has_norm))
            if has_norm:
                layers.append(_norm_layer(norm, widths[i]))
            self.downs.append(nn.Sequential(*layers))

        n_noise = max(0, min(3, depth - 3))
        self.noise_levels = [depth - 1 - j for j in range(1, n_noise + 1)]
        # ups[i] undoes downs[i]; it runs innermost first. Input: the innermost code, or the previous
        # decoder output concatenated with the skip of the same level (hence 2 * width).
        self.ups = nn.ModuleList()
        for i in range(depth):
            cin = widths[i] if i == depth - 1 else 2 * widths[i]
            layers = [nn.ReLU(inplace=False)]
            if i == 0:
                layers += [nn.ConvTranspose2d(cin, out_channels, 4, 2, 1, bias=True), nn.Tanh()]
            else:
                layers += [nn.ConvTranspose2d(cin, widths[i - 1], 4, 2, 1, bias=bias),
                           _norm_layer(norm, widths[i - 1])]
                if i in self.noise_levels and dropout > 0:
                    layers.append(NoiseDropout(dropout))
            self.ups.append(nn.Sequential(*layers))
        init_weights(self)

    @property
    def deterministic(self) -> bool:
        """True when no NoiseDropout is active at inference (the output is a function of x alone)."""
        drops = [m for m in self.modules() if isinstance(m, NoiseDropout)]
        return all(m.deterministic for m in drops)

    @deterministic.setter
    def deterministic(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, NoiseDropout):
                m.deterministic = bool(value)

    def forward(self, x: torch.Tensor, expression: torch.Tensor | None = None) -> torch.Tensor:
        """G(x, z), or G(x, e, z) with `expression` e ((N,) class indexes) for a generator told the expression;
        a generator that is not ignores it."""
        h = x
        if self.expressions:
            if expression is None:
                raise ValueError("this generator is told the expression to keep: pass expression (N,) indexes")
            code = F.one_hot(expression.long(), self.expressions).to(x.dtype).mul(2).sub(1)
            h = torch.cat([x, code[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        skips = []
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.ups[-1](h)
        for i in range(self.depth - 2, -1, -1):
            h = self.ups[i](torch.cat([skips[i], h], dim=1))
        return median3(h) if self.median_output else h


def warm_start_state(generator: UNetGenerator, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The warm start's weights (an autoencoder, not told the expression) for `generator`: a generator told
    the expression gets zero weights on those channels of its first convolution, so the GAN starts from the
    autoencoder's faces whatever it is told."""
    first = "downs.0.0.weight"
    weight = state[first]
    if weight.shape[1] == generator.downs[0][0].in_channels:
        return state
    zeros = weight.new_zeros(weight.shape[0], generator.expressions, *weight.shape[2:])
    return {**state, first: torch.cat([weight, zeros], dim=1)}


def median3(images: torch.Tensor) -> torch.Tensor:
    """The 3x3 median of each channel of NCHW `images`, edges reflected; its gradient reaches the median pixel."""
    n, c, h, w = images.shape
    windows = F.pad(images, (1, 1, 1, 1), mode="reflect").unfold(2, 3, 1).unfold(3, 3, 1)
    return windows.reshape(n, c, h, w, 9).median(dim=-1).values


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN D(x, y): a map of real/fake logits, one per overlapping patch.

    Conditional: x (the input face) and y (the candidate: a real face, or G(x, z)) are concatenated on
    channels (in_channels = 3 + 3). `n_layers` stride-2 Conv-Norm-LeakyReLU(0.2) blocks (no norm on the
    first), then a stride-1 block and a stride-1 conv to one channel, all 4x4: with n_layers = 3 each logit
    sees 70x70 pixels, and the map is 30x30 at 256 px, 2x2 at 32 px (needs image side >= 3 * 2**n_layers).
    No sigmoid: the losses use BCE-with-logits, which is numerically stable and autocast-safe.
    """

    def __init__(self, ndf: int = 64, n_layers: int = 3, norm: str = "batch", in_channels: int = 6):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers!r}")
        self.config: dict[str, Any] = dict(
            ndf=int(ndf), n_layers=int(n_layers), norm=norm, in_channels=int(in_channels)
        )
        bias = norm == "instance"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=bias),
                       _norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=bias),
                   _norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2),
                   nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.model = nn.Sequential(*layers)
        self.min_image_size = 3 * 2**n_layers
        init_weights(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_image_size:
            raise ValueError(
                f"PatchDiscriminator(n_layers={self.config['n_layers']}) needs images of side >= "
                f"{self.min_image_size}, got {tuple(x.shape[-2:])}"
            )
        return self.model(torch.cat([x, y], dim=1))


# --------------------------------------------------------------------------------------------------
# Verifiers (frozen during GAN training)
# --------------------------------------------------------------------------------------------------


class IdentityVerifier(nn.Module):
    """Identity verifier V: VGG-16 (torchvision configuration "D"), width-scaled, with BatchNorm.

    Thirteen 3x3 convs in five stages, each followed by a 2x2 max-pool, then two hidden fully connected
    layers (4096 * width, dropout 0.5) and M identity logits. Differences from the paper's VGG-16, and why:
    - BatchNorm after every conv (torchvision's vgg16_bn): plain VGG-16 trained from scratch (we cannot
      download ImageNet weights) does not converge at our budgets; VGG itself was trained by growing from
      VGG-11, which we cannot afford.
    - channel widths and the hidden size scale with `width` (rounded, at least 4 channels and 16 hidden
      units), so CPU presets can use a 1/8-width VGG with the same depth and shape.
    - the last feature map is average-pooled to min(image_size / 32, 7) squared before flattening:
      exactly torchvision's 7x7 at >= 224 px, and 1x1 at 32 px, so any power-of-two input >= 32 works.
    """

    def __init__(self, num_identities: int, image_size: int, width: float = 1.0):
        super().__init__()
        image_size = _check_image_size(image_size, low=32, high=None)
        if num_identities < 1:
            raise ValueError(f"num_identities must be >= 1, got {num_identities!r}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        self.config: dict[str, Any] = dict(
            num_identities=int(num_identities), image_size=image_size, width=float(width)
        )
        layers: list[nn.Module] = []
        cin = 3
        from torchvision.models.vgg import cfgs  # here, not at the top: see _resnet_block

        for v in cfgs["D"]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = max(4, int(round(int(v) * width)))
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        pooled = min(image_size // 32, 7)
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        hidden = max(16, int(round(4096 * width)))
        self.classifier = nn.Sequential(
            nn.Linear(cin * pooled * pooled, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(hidden, num_identities),
        )
        # torchvision's VGG initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(h, 1))


class SeparableConv2d(nn.Sequential):
    """Keras SeparableConv2D (depth multiplier 1, no bias): depthwise 3x3 then pointwise 1x1."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(cin, cin, kernel_size, padding=kernel_size // 2, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
        )


class XceptionBlock(nn.Module):
    """One mini-Xception residual module, halving the resolution.

    residual: 1x1 stride-2 conv + BN; main: sepconv-BN-ReLU-sepconv-BN-maxpool(3, stride 2, pad 1); sum.
    Both branches map side n to floor((n - 1) / 2) + 1, so the sum is always defined.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
        self.main = nn.Sequential(
            SeparableConv2d(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            SeparableConv2d(cout, cout), nn.BatchNorm2d(cout),
            nn.MaxPool2d(3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.residual(x)


class EmotionVerifier(nn.Module):
    """Emotion verifier S: mini-Xception (Arriaga et al., 2017), about 57k parameters for 7 classes.

    Grey input, as in the original (FER-2013 is grey): RGB [-1, 1] images are converted to ITU-R 601 luma
    here. Two unpadded 3x3 convs with 8 filters (BN, ReLU), four residual depthwise-separable modules with
    16, 32, 64, 128 filters, a 3x3 conv to `num_emotions` maps and global average pooling -> logits.
    Fully convolutional, so it takes any input side >= 5 (32 px and up in practice).
    """

    def __init__(self, num_emotions: int = NUM_EMOTIONS):
        super().__init__()
        if num_emotions < 1:
            raise ValueError(f"num_emotions must be >= 1, got {num_emotions!r}")
        self.config: dict[str, Any] = dict(num_emotions=int(num_emotions))
        self.stem = nn.Sequential(
            nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        )
        blocks, cin = [], 8
        for cout in (16, 32, 64, 128):
            blocks.append(XceptionBlock(cin, cout))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, num_emotions, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(to_grey(x)))
        return self.head(h).mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------------
# Independent evaluators (measure only; never inside a loss)
# --------------------------------------------------------------------------------------------------


def _resnet_block(cin: int, cout: int, stride: int, downsample: nn.Module | None) -> nn.Module:
    """torchvision's ResNet BasicBlock. torchvision is imported where a network needs it, not with this
    module: importing it costs 1.3 s (it loads torch._dynamo), which every Ray process that unpickles a
    training loop (each trial's Tune process, each Train controller) would pay without building any network."""
    from torchvision.models.resnet import BasicBlock

    return BasicBlock(cin, cout, stride=stride, downsample=downsample)


class ResNetClassifier(nn.Module):
    """ResNet-18-shaped classifier: the independent evaluators V_e (identity) and S_e (emotion, grey).

    The generator is trained to fool V (VGG) and satisfy S (mini-Xception); adversarial perturbations
    transfer poorly across architectures, so measuring with a ResNet trained with another seed tells
    whether identity is really gone rather than just hidden from V. Shape: torchvision's BasicBlock in
    four stages of `blocks` blocks with widths base_width * (1, 2, 4, 8); small-image stem (3x3 conv,
    stride 1, no max-pool: the ImageNet stem would shrink a 32 px face to 8 px before the first block);
    global average pooling; linear head. `grey=True` converts RGB to luma first (the emotion evaluator,
    like S, sees grey faces).
    """

    def __init__(
        self,
        num_classes: int,
        base_width: int = 16,
        blocks: tuple[int, ...] | list[int] = (2, 2, 2, 2),
        grey: bool = False,
    ):
        super().__init__()
        blocks = [int(b) for b in blocks]
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        if base_width < 1 or not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"base_width must be >= 1 and blocks non-empty positive, got {base_width}, {blocks}")
        self.config: dict[str, Any] = dict(
            num_classes=int(num_classes), base_width=int(base_width), blocks=blocks, grey=bool(grey)
        )
        self.grey = bool(grey)
        self.stem = nn.Sequential(
            nn.Conv2d(1 if grey else 3, base_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(base_width), nn.ReLU(inplace=True),
        )
        stages, cin = [], base_width
        for s, n in enumerate(blocks):
            cout, stride = base_width * 2**s, (1 if s == 0 else 2)
            layers = []
            for b in range(n):
                st = stride if b == 0 else 1
                down = None
                if st != 1 or cin != cout:
                    down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=st, bias=False), nn.BatchNorm2d(cout))
                layers.append(_resnet_block(cin, cout, stride=st, downsample=down))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grey:
            x = to_grey(x)
        h = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


# --------------------------------------------------------------------------------------------------
# The expression readers that pick between draws of the noise z (core/draws.py)
# --------------------------------------------------------------------------------------------------


def reader_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Six views of images (N, C, H, W): themselves, their mirror, and shifts of 1/32 of their width (2 px
    at 64) left, right, up and down."""
    shift = max(1, x.shape[-1] // 32)
    return [x, x.flip(-1), x.roll(shift, -1), x.roll(-shift, -1), x.roll(shift, -2), x.roll(-shift, -2)]


class ExpressionReaders(nn.Module):
    """Several emotion classifiers read as one: the log of their mean class probabilities (softmax gives the
    mean back), each over `reader_views` when `views`, else over the image alone.

    `members`: the records' `kind` and `config` of each classifier (their weights are this module's
    `members.<i>.*`), so a checkpoint rebuilds the whole ensemble from its config like any network.
    """

    def __init__(self, members: list[dict[str, Any]], views: bool = False):
        super().__init__()
        if not members:
            raise ValueError("an ensemble of expression readers needs at least one member")
        self.config: dict[str, Any] = dict(members=[{"kind": m["kind"], "config": dict(m["config"])} for m in members],
                                           views=bool(views))
        self.members = nn.ModuleList(build_network(m["kind"], **m["config"]) for m in members)
        self.views = bool(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = reader_views(x) if self.views else [x]
        probs = torch.stack([torch.softmax(m(v).float(), dim=1) for m in self.members for v in images]).mean(0)
        return probs.clamp_min(1e-12).log()


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d into the convolution before it, in place, for a network that no longer learns.

    In eval mode a batch norm is a fixed per-channel affine map, so the convolution can apply it: the
    frozen verifiers and readers of the GAN step then skip a normalisation forward and backward per layer
    (`python -m benchmarks.train_step`: the V and S columns). "Before" is registration order, which is
    data-flow order in every classifier here (Sequential stages, torchvision's BasicBlock); a Sequential
    ending in a convolution (the separable convolutions) counts as that convolution. The caller must not
    train the result: its batch norms are gone.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module.eval()
    for parent in list(module.modules()):
        names = [name for name, _ in parent.named_children()]
        for before, name in zip(names, names[1:]):
            norm, previous = getattr(parent, name), getattr(parent, before)
            if not isinstance(norm, nn.BatchNorm2d):
                continue
            owner, key = parent, before
            if isinstance(previous, nn.Sequential) and len(previous):
                owner, key = previous, str(len(previous) - 1)
            conv = getattr(owner, key)
            if isinstance(conv, nn.Conv2d):
                setattr(owner, key, fuse_conv_bn_eval(conv, norm))
                setattr(parent, name, nn.Identity())
    return module


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

NETWORKS: dict[str, type[nn.Module]] = {
    "generator": UNetGenerator,
    "discriminator": PatchDiscriminator,
    "identity_verifier": IdentityVerifier,
    "emotion_verifier": EmotionVerifier,
    "identity_evaluator": ResNetClassifier,
    "emotion_evaluator": ResNetClassifier,
    "expression_picker": ResNetClassifier,  # an emotion classifier of its own seed that only picks between draws
    "expression_readers": ExpressionReaders,
}


def build_network(kind: str, **kwargs: Any) -> nn.Module:
    """Rebuild a network from its registry kind and its `config` (e.g. read back from a checkpoint)."""
    try:
        cls = NETWORKS[kind]
    except KeyError:
        raise ValueError(f"unknown network kind {kind!r}; known kinds: {sorted(NETWORKS)}") from None
    return cls(**kwargs)
