"""Face detection shared by data preparation (RaFD head crops) and deployment: OpenCV and numpy only (no
Ray, no torch), so that neither needs the other."""

from epd_ray.faces.detectors import (DETECTORS, MIN_FACE, Box, CenterFaceDetector, Detector, HaarDetector,
                                     make_detector)

__all__ = ["DETECTORS", "MIN_FACE", "Box", "CenterFaceDetector", "Detector", "HaarDetector", "make_detector"]
