"""One image file to one training-size RGB face, or a reason why not.

Every way a file can be unusable has a named reason, so `prepare` can list it in `rejects.csv` instead
of dropping it silently: empty, undecodable, truncated, too large to decode safely (a decompression
bomb), too small for the training size. Images that are usable but not 8-bit RGB (grey, palette, RGBA,
CMYK, 16-bit) are converted and the conversion is named, so it can be counted. EXIF orientation is
applied before cropping, so a phone photo stored sideways is not trained on sideways.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Reasons a file is rejected (the `reason` column of rejects.csv starts with one of these).
EMPTY = "empty file"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"
TOO_LARGE = "too large (decompression bomb guard)"
TOO_SMALL = "too small"
DUPLICATE = "duplicate"
UNLABELLED = "unlabelled"
UNKNOWN_LABEL = "label outside the class list"
MISSING = "missing file"
NO_FACE = "no face found"
REJECT_REASONS = (EMPTY, UNDECODABLE, TRUNCATED, TOO_LARGE, TOO_SMALL, DUPLICATE, UNLABELLED, UNKNOWN_LABEL,
                  MISSING, NO_FACE)


class Rejected(Exception):
    """A file that cannot become a training face; `reason` is one of REJECT_REASONS, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Face:
    pixels: np.ndarray        # (size, size, 3) uint8
    converted_from: str       # "" for 8-bit RGB input, else the PIL mode it was converted from


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode fully (truncation shows up here, not later), refusing bombs from the header alone."""
    if not data:
        raise Rejected(EMPTY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected(UNDECODABLE, "not an image format PIL reads") from None
    except Image.DecompressionBombError as exc:
        raise Rejected(TOO_LARGE, str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise Rejected(UNDECODABLE, str(exc)) from None
    width, height = image.size
    if width * height > max_pixels:  # checked on the header: the pixels are never decoded
        raise Rejected(TOO_LARGE, f"{width}x{height} is over {max_pixels} pixels")
    try:
        image.load()
    except OSError as exc:
        reason = TRUNCATED if "truncated" in str(exc).lower() or "broken data stream" in str(exc) else UNDECODABLE
        raise Rejected(reason, str(exc)) from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise Rejected(UNDECODABLE, str(exc)) from None
    return image


def to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """8-bit RGB, and the mode it came from when it was anything else.

    16-bit images are scaled (not clipped) into 8 bits; transparent pixels go onto white, as a viewer
    shows them.
    """
    mode = image.mode
    if mode == "RGB":
        return image, ""
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode != "I" or wide.max() > 255 else 255.0
        grey = Image.fromarray(np.clip(np.rint(wide / top * 255.0), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB"), "16-bit"
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB"), mode
    return image.convert("RGB"), mode


def square_crop(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The given box, or the largest centred square."""
    if box is not None:
        return image.crop(box)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def read_rgb(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Bytes of an image file -> the upright 8-bit RGB image, and the mode it was converted from ("" for RGB)."""
    return to_rgb(ImageOps.exif_transpose(open_image(data, max_pixels)))


def decode_face(data: bytes, size: int, *, max_pixels: int, min_side: int | None = None,
                crop=square_crop) -> Face:
    """Bytes of an image file -> a `size` x `size` RGB face.

    `crop(image)` cuts the face out (default: the centred square; RaFD's full frames use a head crop).
    A crop whose side is under `min_side` (default `size`) is rejected as too small: upscaling it would
    train on blur.
    """
    image, converted_from = read_rgb(data, max_pixels)
    face = crop(image)
    side = min(face.size)
    if side < (size if min_side is None else min_side):
        raise Rejected(TOO_SMALL, f"face {face.size[0]}x{face.size[1]} px, training size {size}")
    if face.size != (size, size):
        face = face.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return Face(np.asarray(face, dtype=np.uint8).copy(), converted_from)
