"""Collect faces from several images (or video frames) and run them through the generator together.

A job is one image (or frame) with the faces to replace in it. Jobs are finished strictly in the order
they were added, so video frames are written in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from epd_ray.deploy.engine import FaceEngine
from epd_ray.deploy.faces import cut, face_mask, paste, resize
from epd_ray.faces import Region


@dataclass
class Job:
    image: np.ndarray  # RGB uint8, changed in place
    faces: list[tuple[Region, int]] = field(default_factory=list)  # (region, seed) of each face to replace
    done: Callable[[np.ndarray], None] = lambda image: None
    fail: Callable[[Exception], None] | None = None  # None: the exception propagates
    aligned_seed: int | None = None  # set: the whole image is one aligned face crop

    @property
    def size(self) -> int:
        return 1 if self.aligned_seed is not None else len(self.faces)


class Batcher:
    def __init__(self, engine: FaceEngine, max_jobs: int | None = None):
        self.engine = engine
        self.max_jobs = max_jobs or max(8, 2 * engine.batch_size)  # bounds frames held for face-less frames
        self.jobs: list[Job] = []
        self.pending = 0
        self.replaced = 0

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        self.pending += job.size
        if self.pending >= self.engine.batch_size or len(self.jobs) >= self.max_jobs:
            self.flush()

    def flush(self) -> None:
        jobs, self.jobs, self.pending = self.jobs, [], 0
        if not jobs:
            return
        size = self.engine.size
        try:
            crops, seeds = [], []
            for job in jobs:
                if job.aligned_seed is not None:
                    crops.append(resize(job.image, size))
                    seeds.append(job.aligned_seed)
                else:
                    for region, seed in job.faces:
                        crops.append(resize(cut(job.image, region), size))
                        seeds.append(seed)
            out = self.engine(np.stack(crops), seeds) if crops else np.empty((0, size, size, 3), np.uint8)
        except Exception as exc:
            for job in jobs:
                if job.fail is None:
                    raise
                job.fail(exc)
            return
        k = 0
        for job in jobs:
            if job.aligned_seed is not None:
                h, w = job.image.shape[:2]
                job.image[...] = resize(out[k], w, h)
                k += 1
            else:
                for region, _ in job.faces:
                    paste(job.image, region, resize(out[k], region.side), face_mask(region))
                    k += 1
            self.replaced += job.size
            job.done(job.image)
