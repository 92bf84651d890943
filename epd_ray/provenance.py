"""What produced an artefact: package versions for model cards and exported models (no Ray import)."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("epd-ray", "torch", "torchvision", "ray", "optuna", "pytorch-msssim", "numpy", "pyarrow", "pillow",
            "opencv-python-headless")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
