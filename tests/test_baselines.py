"""Classical de-identification baselines: behaviour, shapes, dtypes and ranges."""

import numpy as np
import pytest
import torch

from epd_ray.core.baselines import BASELINES, gaussian_blur, k_same_pixel, no_change, pixelate
from epd_ray.core.images import to_grey, to_tensor, to_uint8, to_unit

torch.set_num_threads(2)


def faces(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def high_frequency_energy(x):
    """Mean squared difference between horizontally and vertically adjacent pixels."""
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()


def test_registry():
    assert set(BASELINES) == {"identity", "blur", "pixelate", "ksame"}
    x = faces()
    assert torch.equal(BASELINES["identity"](x), x)
    assert no_change(x) is not x


def test_blur_keeps_mean_colour_and_removes_high_frequency():
    x = faces(2, 32)
    y = gaussian_blur(x, sigma=2.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1 and y.max() <= 1
    assert torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02)
    assert high_frequency_energy(y) < 0.05 * high_frequency_energy(x)
    # stronger blur, less detail; sigma 0 changes nothing; default sigma = side / 16
    assert high_frequency_energy(gaussian_blur(x, 4.0)) < high_frequency_energy(y)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    assert torch.allclose(gaussian_blur(x), y)


def test_blur_keeps_flat_image_flat():
    x = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(gaussian_blur(x, 3.0), x, atol=1e-6)


@pytest.mark.parametrize("blocks", [1, 4, 8])
def test_pixelate_gives_constant_blocks_of_the_block_mean(blocks):
    x = faces(2, 32)
    y = pixelate(x, blocks)
    assert y.shape == x.shape and y.dtype == x.dtype
    cell = 32 // blocks
    cells = y.view(2, 3, blocks, cell, blocks, cell)
    assert torch.allclose(cells, cells[:, :, :, :1, :, :1].expand_as(cells))  # constant within each cell
    means = x.view(2, 3, blocks, cell, blocks, cell).mean(dim=(3, 5))
    assert torch.allclose(cells[:, :, :, 0, :, 0], means, atol=1e-6)  # area averaging
    with pytest.raises(ValueError):
        pixelate(x, 0)


def test_k_same_never_uses_probe_identity():
    # Gallery: identity 0 is an exact copy of the probe; others are flat images of distinct values.
    probe = torch.full((1, 3, 8, 8), 0.5)
    gallery = torch.stack([torch.full((3, 8, 8), v) for v in (0.5, 0.4, -0.2, 0.9, -1.0)])
    gallery_id = torch.tensor([0, 1, 2, 3, 4])
    out = k_same_pixel(probe, torch.tensor([0]), gallery, gallery_id, k=2)
    # nearest other identities to 0.5: 0.4 (id 1) and 0.9 (id 3) -> mean 0.65; the copy (id 0) excluded
    assert torch.allclose(out, torch.full_like(probe, 0.65))
    # k = 1 -> the single nearest other face
    assert torch.allclose(k_same_pixel(probe, [0], gallery, gallery_id, k=1), torch.full_like(probe, 0.4))


def test_k_same_uses_all_others_when_fewer_than_k():
    probe = faces(1, 8)
    gallery = torch.cat([probe, torch.full((2, 3, 8, 8), 0.2), torch.full((1, 3, 8, 8), -0.4)])
    gallery_id = torch.tensor([7, 7, 1, 2])  # only ids 1 and 2 are other identities
    out = k_same_pixel(probe, [7], gallery, gallery_id, k=5)
    assert torch.allclose(out, torch.full_like(probe, (0.2 - 0.4) / 2), atol=1e-6)
    with pytest.raises(ValueError, match="another identity"):
        k_same_pixel(probe, [7], gallery[:2], gallery_id[:2], k=2)


def test_k_same_batch_shape_dtype_range_and_chunking():
    gallery, gallery_id = faces(20, 16, seed=1), torch.arange(20) % 5
    x, ids = faces(6, 16, seed=2), torch.tensor([0, 1, 2, 3, 4, 0])
    out = k_same_pixel(x, ids, gallery, gallery_id, k=3)
    assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out, k_same_pixel(x, ids, gallery, gallery_id, k=3, chunk=4), atol=1e-6)
    # each output is the mean of 3 gallery faces none of which has the probe's identity
    flat = gallery.flatten(1)
    for i in range(6):
        allowed = gallery_id != ids[i]
        d = torch.cdist(x[i].flatten()[None], flat)[0].masked_fill(~allowed, float("inf"))
        expected = flat[d.topk(3, largest=False).indices].mean(0)
        assert torch.allclose(out[i].flatten(), expected, atol=1e-5)


def test_baselines_keep_bf16_dtype():
    x = faces(2, 32).bfloat16()
    for name, fn in (("blur", lambda t: gaussian_blur(t, 1.0)), ("pixelate", lambda t: pixelate(t, 4))):
        y = fn(x)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape, name


# ------------------------------------------------------------------ image conversions


def test_image_conversions_roundtrip():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    t = to_tensor(pixels)
    assert t.shape == (3, 3, 16, 16) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert to_tensor(np.array([[[0, 255, 128]]], dtype=np.uint8))[0, :, 0, 0].tolist() == pytest.approx(
        [-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6
    )
    assert np.array_equal(to_uint8(t), pixels)
    assert np.array_equal(to_uint8(to_tensor(torch.from_numpy(pixels[0]))), pixels[:1])
    assert torch.allclose(to_unit(t), torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(ValueError):
        to_tensor(pixels.astype(np.float32))


def test_to_grey_luma_601():
    x = torch.zeros(1, 3, 2, 2)
    x[:, 0] = 1.0  # pure red at +1, others at 0
    g = to_grey(x)
    assert g.shape == (1, 1, 2, 2) and torch.allclose(g, torch.full_like(g, 0.299))
    assert torch.allclose(to_grey(torch.ones(1, 3, 2, 2)), torch.ones(1, 1, 2, 2))
    assert to_grey(g) is g
