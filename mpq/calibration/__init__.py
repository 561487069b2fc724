"""Calibration data: text sources (``SOURCES``), the options that choose them, and reproducible,
hashed token sample sets."""
from mpq.calibration.dataset import CalibrationSet, build_calibration_set
from mpq.calibration.options import CalibrationOptions
from mpq.calibration.sources import SOURCES

__all__ = ["CalibrationOptions", "CalibrationSet", "SOURCES", "build_calibration_set"]
