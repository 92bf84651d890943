"""Deployment: export a trained generator as a model folder, and de-identify images, folders and videos.

Plain PyTorch + OpenCV + PIL; nothing here imports Ray or training code, so a deployed model needs only
this package's core.
"""

from epd_ray.deploy.deidentify import DeidentifyOptions, Summary, deidentify
from epd_ray.deploy.engine import FaceEngine, seeded_noise
from epd_ray.deploy.export import DeployError, export_model, load_model

__all__ = ["DeidentifyOptions", "DeployError", "FaceEngine", "Summary", "deidentify", "export_model", "load_model",
           "seeded_noise"]
