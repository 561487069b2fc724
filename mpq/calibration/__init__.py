"""Calibration data: text sources (``SOURCES``) and reproducible, hashed token sample sets."""
from mpq.calibration.dataset import CalibrationSet, build_calibration_set
from mpq.calibration.sources import SOURCES

__all__ = ["CalibrationSet", "SOURCES", "build_calibration_set"]
