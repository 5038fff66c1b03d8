"""Whole-slide images: one OpenSlide-like `Slide` API over two readers, the format table that picks one, patch grids
on tissue (`tiling`) and outlines of patch sets (`outlines`)."""

from .base import BACKGROUND, MAX_SCAN_MPP, Resample, Slide, SlideError
from .formats import FORMATS, SLIDE_EXTENSIONS, SlideFormat, dicom_instance
from .opening import Backend, file_signature, open_slide

__all__ = [
    "BACKGROUND",
    "FORMATS",
    "MAX_SCAN_MPP",
    "SLIDE_EXTENSIONS",
    "Backend",
    "Resample",
    "Slide",
    "SlideError",
    "SlideFormat",
    "dicom_instance",
    "file_signature",
    "open_slide",
]
