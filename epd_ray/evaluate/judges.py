"""Who tries to name the person in a de-identified face, and who reads its expression.

Five identity judges, side by side in every evaluation:
- `evaluators`: V_e, the from-scratch identity evaluator that no loss ever saw (and S_e for expression);
- `verifiers`: V and S, the networks the generator was trained against (flattered, kept for the paper);
- `recogniser`: dlib's pretrained ResNet face recogniser (128-d, 99.38% on LFW), its weights inside the
  `face_recognition_models` package, trained by nobody in epd-ray. It names a probe by the nearest image
  of each identity in a gallery: the train split's originals, as a face database holding earlier photos
  of the same people would. It runs on real faces only: to it, the built-in synthetic faces are no faces
  (its detector finds none and its embeddings name no one reliably), so on synthetic data it is left out;
- `parrot`: an attacker who knows the tool. It takes the main judge's embedding but fills the gallery with
  the *de-identified* train split (with its true labels), then names de-identified test faces. A generator
  that maps each person to a consistent stand-in fools the plain judges and not this one;
- `denoised`: an attacker who first cleans the published face with a 3x3 median filter, then names it with
  the main judge's embedding and gallery. On JAFFE the tuned generator's change is part speckle, and
  recognisers are thrown by speckle: the filter took dlib's rank-1 from 0.10 to 0.27. Privacy that a
  median filter undoes is not privacy. Its zero point is the filtered originals.

Every judge scores against the unchanged images as its zero point (`core.metrics.judged_metrics`), so
doing nothing scores privacy 0 and J 0 under each of them. Plain PyTorch, numpy and dlib: no Ray.
"""

from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from epd_ray.core.images import to_tensor, to_uint8
from epd_ray.core.metrics import judged_metrics
from epd_ray.core.networks import median3
from epd_ray.data.shards import FaceArrays

MAIN_JUDGES = ("evaluators", "recogniser")
RECOGNISER_THRESHOLD = 0.6  # dlib's: two faces closer than this are the same person
CHIP_SIZE = 160  # faces are upsampled to this before landmarks and the 150 px aligned chip
# dlib's ResNet takes about 0.1 s per face on one core and uses one core, so a test split of thousands of
# faces (judged once per method, with the parrot's gallery) takes many minutes: a recogniser given several
# processes spreads its larger batches over them. Below this many faces, starting the processes costs more.
PARALLEL_MIN_FACES = 64
REMEMBERED_BATCHES = 32  # an evaluation embeds its originals, its gallery and two batches per method

Embedder = Callable[[np.ndarray], np.ndarray]


class JudgeError(RuntimeError):
    """A judge that cannot run here; the message says what to install or choose instead."""


def main_judge(configured: str, data_source: str) -> str:
    """The judge the search maximises J under: the recogniser on real faces, the evaluators on synthetic."""
    if configured == "auto":
        return "evaluators" if data_source == "synthetic" else "recogniser"
    return configured


def uses_recogniser(main: str, data_source: str) -> bool:
    """The recogniser judges real faces always, synthetic ones only when asked to be the main judge."""
    return main == "recogniser" or data_source != "synthetic"


class FaceRecogniser:
    """dlib's face recogniser: a 128-d embedding per face image, and whether its HOG detector finds a face.

    Inputs are face crops (uint8 NHWC). Each is upsampled to CHIP_SIZE; landmarks (5 points) are placed in
    the box the detector finds, or in a fixed central box where it finds none, so a face the detector
    misses is still embedded and judged rather than counted as de-identified.

    With `processes` > 1, batches of PARALLEL_MIN_FACES or more are embedded by that many worker processes
    (started on first use, each loading its own dlib; `close` or a `with` block ends them): for the driver's
    evaluations, not inside a training worker that shares its cores. Each distinct batch is embedded once:
    "no change" and its parrot gallery are the originals and the plain gallery, already embedded.
    """

    def __init__(self, processes: int = 1) -> None:
        try:
            import dlib
        except ImportError as exc:  # a broken install: both come with epd-ray
            raise JudgeError(f"the face recogniser needs dlib ({exc}); reinstall epd-ray (dlib-bin)") from None
        spec = importlib.util.find_spec("face_recognition_models")  # its __init__ needs pkg_resources: not run
        if spec is None or not spec.submodule_search_locations:
            raise JudgeError("the face recogniser needs the face_recognition_models package; reinstall epd-ray")
        models = Path(spec.submodule_search_locations[0]) / "models"
        self._dlib = dlib
        self._landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self._detector = dlib.get_frontal_face_detector()
        margin = CHIP_SIZE // 10
        self._fallback_box = dlib.rectangle(margin, margin, CHIP_SIZE - margin, CHIP_SIZE - margin)
        self.processes = max(1, processes)
        self._pool: ProcessPoolExecutor | None = None
        self._embedded: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def __enter__(self) -> "FaceRecogniser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 128) float32 embeddings and (N,) bool: whether a face was found in each image."""
        pixels = np.ascontiguousarray(pixels)
        key = hashlib.blake2b(pixels.data, digest_size=16).digest() + repr(pixels.shape).encode()
        if key not in self._embedded:
            spread = self._embed_spread(pixels) if self.processes > 1 and len(pixels) >= PARALLEL_MIN_FACES else None
            if len(self._embedded) >= REMEMBERED_BATCHES:  # a trial's rounds each bring new faces
                del self._embedded[next(iter(self._embedded))]
            self._embedded[key] = spread if spread is not None else self._embed_here(pixels)
        embeddings, found = self._embedded[key]
        return embeddings.copy(), found.copy()

    def _embed_spread(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Embedded by the worker processes; None where they cannot start. Spawned processes import the
        caller's main script again: a script without an `if __name__ == "__main__":` guard breaks them, and
        its faces are then embedded here, in one process, as before."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.processes, multiprocessing.get_context("spawn"),
                                             initializer=_start_worker)
        try:
            parts = list(self._pool.map(_embed_in_worker, np.array_split(pixels, self.processes * 4)))
        except BrokenProcessPool:
            warnings.warn("the face recogniser could not start its worker processes (a script without an "
                          "`if __name__ == '__main__':` guard?); embedding in one process", stacklevel=3)
            self.close()
            self.processes = 1
            return None
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _embed_here(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeddings = np.zeros((len(pixels), 128), np.float32)
        found = np.zeros(len(pixels), bool)
        for i, image in enumerate(pixels):
            chip = np.ascontiguousarray(np.asarray(
                Image.fromarray(image).convert("RGB").resize((CHIP_SIZE, CHIP_SIZE), Image.BICUBIC)))
            boxes = self._detector(chip, 1)
            found[i] = len(boxes) > 0
            box = max(boxes, key=lambda b: b.area()) if found[i] else self._fallback_box
            embeddings[i] = np.asarray(self._net.compute_face_descriptor(chip, self._landmarks(chip, box)))
        return embeddings, found


_worker: FaceRecogniser | None = None  # a worker process's own recogniser


def _start_worker() -> None:
    global _worker
    _worker = FaceRecogniser()


def _embed_in_worker(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _worker._embed_here(pixels)


@dataclass(frozen=True)
class Gallery:
    """Embeddings of known faces with their identities: a judge names a probe by its nearest gallery face."""

    embeddings: np.ndarray
    identity: np.ndarray
    num_identities: int

    @classmethod
    def of(cls, embed: Embedder, faces: FaceArrays, num_identities: int) -> "Gallery":
        """`faces` as the judge `embed` (pixels -> embeddings) sees them."""
        return cls(embed(faces.pixels), faces.identity, num_identities)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, M) distance of each probe to the nearest gallery face of each identity (inf: none known)."""
        pair = np.linalg.norm(embeddings[:, None, :].astype(np.float64)
                              - self.embeddings[None, :, :].astype(np.float64), axis=2)
        out = np.full((len(embeddings), self.num_identities), np.inf)
        for ident in np.unique(self.identity):
            out[:, ident] = pair[:, self.identity == ident].min(axis=1)
        return out

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Higher is "more like identity j": the negated nearest distance (-inf for an identity not in it)."""
        return -self.distances(embeddings)


def recogniser_metrics(recogniser_gallery: Gallery, embed_orig: np.ndarray, embed_deid: np.ndarray,
                       found_orig: np.ndarray, found_deid: np.ndarray, identity: np.ndarray,
                       emotion_probs_orig: Any, emotion_probs_deid: Any, emotion: np.ndarray, ssim: Any,
                       ssim_weight: float) -> dict[str, Any]:
    """`judged_metrics` under the recogniser, plus its own figures: the share still verified as the same
    person at dlib's threshold (nearest own-identity gallery face closer than 0.6) and the share in which
    its detector still finds a face, each also on the originals."""
    dist_orig, dist_deid = recogniser_gallery.distances(embed_orig), recogniser_gallery.distances(embed_deid)
    own = np.arange(len(identity)), identity
    out = judged_metrics(-dist_orig, -dist_deid, emotion_probs_orig, emotion_probs_deid, identity, emotion, ssim,
                         ssim_weight)
    out.update(verified_original=float(np.mean(dist_orig[own] < RECOGNISER_THRESHOLD)),
               verified=float(np.mean(dist_deid[own] < RECOGNISER_THRESHOLD)),
               face_found_original=float(np.mean(found_orig)), face_found=float(np.mean(found_deid)),
               threshold=RECOGNISER_THRESHOLD)
    return out


def attack_metrics(plain_gallery: Gallery, attack_gallery: Gallery, embed_orig: np.ndarray, embed_deid: np.ndarray,
                   identity: np.ndarray, emotion_probs_orig: Any, emotion_probs_deid: Any, emotion: np.ndarray,
                   ssim: Any, ssim_weight: float) -> dict[str, Any]:
    """An attack: de-identified probes (as the attacker sees them) named against the attacker's gallery: for
    the parrot, de-identified train faces; for the denoiser, the plain one. Its zero point is the same
    embedding and the plain gallery on the unchanged images (as the attacker sees them), so "no change"
    still scores privacy 0."""
    return judged_metrics(plain_gallery.scores(embed_orig), attack_gallery.scores(embed_deid), emotion_probs_orig,
                          emotion_probs_deid, identity, emotion, ssim, ssim_weight)


def denoise(pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The denoising attacker's first step: a 3x3 median filter on each face (uint8 NHWC), the very median a
    generator with `model.median_output` publishes through (`median3`), batch by batch."""
    return np.concatenate([to_uint8(median3(to_tensor(pixels[start:start + batch_size])))
                           for start in range(0, len(pixels), batch_size)]) if len(pixels) else pixels.copy()
