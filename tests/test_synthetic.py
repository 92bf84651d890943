"""Tests of the synthetic face source.

Beyond shapes and determinism, the important property is *learnability*: de-identification results on
the synthetic set only mean something if a small CNN can tell its identities apart (from colour images)
and its emotions apart (from greyscale images, as the emotion verifier sees them) on held-out pictures of
the same people. Held-out pictures come from ``variation_offset``: same seed, same people, new nuisance.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from epd_ray.core.labels import EMOTIONS, NUM_EMOTIONS
from epd_ray.core.synthetic import (
    IdentityTraits,
    Nuisance,
    SyntheticFaces,
    make_synthetic_faces,
    render_face,
)

# ---------------------------------------------------------------------------------------------------------
# Structure and determinism
# ---------------------------------------------------------------------------------------------------------


def test_shapes_dtypes_labels_and_order():
    faces = make_synthetic_faces(num_identities=3, variations=2, image_size=32, seed=0)
    assert isinstance(faces, SyntheticFaces)
    n = 3 * NUM_EMOTIONS * 2
    assert faces.pixels.shape == (n, 32, 32, 3)
    assert faces.pixels.dtype == np.uint8
    assert faces.identity.shape == (n,) and faces.identity.dtype == np.int64
    assert faces.emotion.shape == (n,) and faces.emotion.dtype == np.int64
    assert faces.identity.min() == 0 and faces.identity.max() == 2
    assert faces.emotion.min() == 0 and faces.emotion.max() == NUM_EMOTIONS - 1
    # identity-major, then emotion, then variation
    expected_id = np.repeat(np.arange(3), NUM_EMOTIONS * 2)
    expected_emo = np.tile(np.repeat(np.arange(NUM_EMOTIONS), 2), 3)
    np.testing.assert_array_equal(faces.identity, expected_id)
    np.testing.assert_array_equal(faces.emotion, expected_emo)
    assert faces.identity_names == ["synthetic-000", "synthetic-001", "synthetic-002"]
    assert len(faces.source) == n and len(set(faces.source)) == n
    assert faces.source[0] == "synthetic:seed=0:identity=0:emotion=angry:variation=0"
    assert faces.source[2 * 3 + 1] == f"synthetic:seed=0:identity=0:emotion={EMOTIONS[3]}:variation=1"
    # not blank: every image has real content
    assert (faces.pixels.reshape(n, -1).std(axis=1) > 10).all()


@pytest.mark.parametrize("size", [32, 33, 64, 100, 256])
def test_sizes(size):
    faces = make_synthetic_faces(1, 1, size, seed=1)
    assert faces.pixels.shape == (NUM_EMOTIONS, size, size, 3)


def test_deterministic_and_seed_dependent():
    a = make_synthetic_faces(2, 2, 48, seed=5)
    b = make_synthetic_faces(2, 2, 48, seed=5)
    assert a.pixels.tobytes() == b.pixels.tobytes()
    assert a.source == b.source
    c = make_synthetic_faces(2, 2, 48, seed=6)
    assert not np.array_equal(a.pixels, c.pixels)


def test_variation_offset_gives_new_images_of_the_same_people():
    base = make_synthetic_faces(2, 3, 32, seed=0)
    shifted = make_synthetic_faces(2, 2, 32, seed=0, variation_offset=1)
    # variations 1 and 2 are shared, so those images are byte-identical (per-image seeding)
    for ident in range(2):
        for emo in range(NUM_EMOTIONS):
            i0 = (ident * NUM_EMOTIONS + emo) * 3
            i1 = (ident * NUM_EMOTIONS + emo) * 2
            np.testing.assert_array_equal(base.pixels[i0 + 1 : i0 + 3], shifted.pixels[i1 : i1 + 2])
    assert shifted.source[0].endswith("variation=1")
    held_out = make_synthetic_faces(2, 2, 32, seed=0, variation_offset=100)
    assert not np.array_equal(held_out.pixels, base.pixels[: len(held_out.pixels)])


@pytest.mark.parametrize("size", [31, 257, 0, -5, 32.0, "64", True])
def test_bad_size_rejected(size):
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_faces(1, 1, size)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_identities": 0}, "num_identities"),
        ({"variations": 0}, "variations"),
        ({"seed": -1}, "seed"),
        ({"variation_offset": -1}, "variation_offset"),
    ],
)
def test_bad_counts_rejected(kwargs, field):
    args = {"num_identities": 1, "variations": 1, "image_size": 32, **kwargs}
    with pytest.raises(ValueError, match=field):
        make_synthetic_faces(**args)


def test_render_face_is_pure_and_emotion_only_moves_expression():
    rng = np.random.default_rng(0)
    traits = IdentityTraits.sample(rng)
    nz = Nuisance.sample(rng)
    a = render_face(traits, 3, nz, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, render_face(traits, 3, nz, 64))
    with pytest.raises(ValueError, match="emotion"):
        render_face(traits, NUM_EMOTIONS, nz, 64)
    # Emotion changes only the middle of the face (brows, eyes, nose, mouth): the outer ring of the
    # image (hair sides, ears, background, neck) stays put. Use a nuisance without noise and rotation.
    calm = Nuisance(0, 0, 0, 1, 0, 1, 0, (120, 130, 140), (120, 130, 140), 0, 0.0, 0, 1.0)
    imgs = np.stack([render_face(traits, e, calm, 64).astype(int) for e in range(NUM_EMOTIONS)])
    diff = np.abs(imgs - imgs[-1]).sum(axis=(0, 3))  # vs neutral, summed over emotions and channels
    ys, xs = np.nonzero(diff > 30)
    assert len(ys) > 0
    assert xs.min() >= 10 and xs.max() <= 54 and ys.min() >= 10 and ys.max() <= 54


def test_identities_differ_more_between_people_than_within():
    """A cheap proxy of identity separability: the mean colour image of each identity (over emotions
    and nuisance) is further from other identities' means than an image is from its own mean."""
    faces = make_synthetic_faces(8, 3, 32, seed=0)
    x = faces.pixels.reshape(len(faces.pixels), -1).astype(np.float64)
    means = np.stack([x[faces.identity == k].mean(0) for k in range(8)])
    d = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    nearest_mean = d.argmin(1)
    assert (nearest_mean == faces.identity).mean() > 0.8


def test_fast_enough():
    t0 = time.perf_counter()
    make_synthetic_faces(4, 5, 32, seed=0)
    elapsed = time.perf_counter() - t0
    # 140 images; the target is 1120 images in well under 10 s, i.e. < 1.25 s here with a wide margin.
    assert elapsed < 3.0, elapsed


# ---------------------------------------------------------------------------------------------------------
# Learnability
# ---------------------------------------------------------------------------------------------------------


def _to_tensor(pixels: np.ndarray, grey: bool):
    import torch

    x = torch.from_numpy(pixels).float().div_(255.0).permute(0, 3, 1, 2)
    if grey:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)
    return x.sub_(0.5).mul_(2.0).contiguous()


def _small_cnn(in_ch: int, num_classes: int, width: int):
    from torch import nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    return nn.Sequential(
        block(in_ch, width), nn.MaxPool2d(2),
        block(width, 2 * width), nn.MaxPool2d(2),
        block(2 * width, 4 * width), nn.MaxPool2d(2),
        block(4 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
    )


def _fit_and_score(train_x, train_y, test_x, test_y, num_classes, *, width, epochs, lr=3e-3, seed=0,
                   augment=False):
    """Train a small CNN with Adam + one-cycle LR and return held-out accuracy."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = _small_cnn(train_x.shape[1], num_classes, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    batch = 64
    steps = epochs * ((len(train_x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(train_x), batch):
            idx = perm[i : i + batch]
            xb = train_x[idx]
            if augment:  # small random shifts: the set already has nuisance, this only regularises
                dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(test_x[i : i + 256]).argmax(1) for i in range(0, len(test_x), 256)])
    return (pred == test_y).float().mean().item()


def _learnability(num_identities, train_var, test_var, *, width, epochs, augment=False):
    import torch

    torch.set_num_threads(2)
    train = make_synthetic_faces(num_identities, train_var, 32, seed=0)
    test = make_synthetic_faces(num_identities, test_var, 32, seed=0, variation_offset=10_000)
    yid_tr, yid_te = torch.from_numpy(train.identity), torch.from_numpy(test.identity)
    yem_tr, yem_te = torch.from_numpy(train.emotion), torch.from_numpy(test.emotion)
    id_acc = _fit_and_score(_to_tensor(train.pixels, False), yid_tr, _to_tensor(test.pixels, False), yid_te,
                            num_identities, width=width, epochs=epochs, augment=augment)
    emo_acc = _fit_and_score(_to_tensor(train.pixels, True), yem_tr, _to_tensor(test.pixels, True), yem_te,
                             NUM_EMOTIONS, width=width, epochs=epochs, augment=augment)
    return id_acc, emo_acc


def test_learnable_quick():
    """10 people x 7 emotions x 8 variations, a tiny CNN for a few seconds: well above chance on held-out
    images (chance is 10% for identity, 14% for emotion)."""
    t0 = time.perf_counter()
    id_acc, emo_acc = _learnability(10, 8, 3, width=8, epochs=10)
    print(f"quick learnability: identity {id_acc:.3f}, emotion (grey) {emo_acc:.3f}, "
          f"{time.perf_counter() - t0:.1f} s")
    assert id_acc > 3 * (1 / 10), id_acc
    assert emo_acc > 3 * (1 / NUM_EMOTIONS), emo_acc


@pytest.mark.slow
def test_learnable_full():
    """The design's promise: >= 95% held-out identity and emotion accuracy with a small CNN."""
    t0 = time.perf_counter()
    id_acc, emo_acc = _learnability(16, 40, 10, width=16, epochs=25, augment=True)
    print(f"full learnability: identity {id_acc:.4f}, emotion (grey) {emo_acc:.4f}, "
          f"{time.perf_counter() - t0:.1f} s")
    assert id_acc >= 0.95, id_acc
    assert emo_acc >= 0.95, emo_acc


@pytest.mark.slow
def test_emotion_generalises_to_unseen_people():
    """De-identified faces are new people, so the emotion signal must not be tied to who shows it:
    train the greyscale emotion CNN on 18 identities and test it on 6 others."""
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    faces = make_synthetic_faces(24, 12, 32, seed=0)
    train = torch.from_numpy(faces.identity < 18)
    x, y = _to_tensor(faces.pixels, True), torch.from_numpy(faces.emotion)
    acc = _fit_and_score(x[train], y[train], x[~train], y[~train], NUM_EMOTIONS, width=16, epochs=20,
                         augment=True)
    print(f"emotion on unseen identities: {acc:.4f}, {time.perf_counter() - t0:.1f} s")
    assert acc >= 0.95, acc
