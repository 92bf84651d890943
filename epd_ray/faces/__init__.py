"""Face detection and the square a face is cut from, shared by data preparation (head crops) and
deployment: OpenCV and numpy only (no Ray, no torch), so that neither needs the other."""

from epd_ray.faces.detectors import (DETECTORS, FACE_MARGIN, MAX_MARGIN, MIN_FACE, Box, CenterFaceDetector, Detector,
                                     HaarDetector, Region, face_region, make_detector)

__all__ = ["DETECTORS", "FACE_MARGIN", "MAX_MARGIN", "MIN_FACE", "Box", "CenterFaceDetector", "Detector",
           "HaarDetector", "Region", "face_region", "make_detector"]
