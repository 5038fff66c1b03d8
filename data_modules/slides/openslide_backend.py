"""Slides read with OpenSlide: MRXS, Leica SCN, Ventana BIF, VMS/VMU, Philips TIFF and DICOM WSI.

These are the formats whose layout tifffile does not map to a plain pyramid (MRXS keeps tiles in side files with
overlaps, BIF and Philips store levels in vendor XML, DICOM spreads levels over instances), so OpenSlide (4.x, from
`openslide-bin`) reads them, behind the same `Slide` API and errors. Its handles are thread-safe and keep their own
tile cache; pixels are composited over white where the file has none (OpenSlide returns them transparent).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import openslide

from .base import BACKGROUND, Slide, SlideError, positive

__all__ = ["OpenSlideSlide", "openslide_format"]


def openslide_format(path: Path) -> str | None:
    """The OpenSlide driver that reads `path` (`mirax`, `dicom`, `philips`, ...), or None."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide; `open_slide` chooses it for the formats tifffile does not read as a pyramid."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None, *, source: Path | None = None) -> None:
        self.path = Path(path)  # what the user named: a DICOM series folder, or the file
        self._source = source or self.path  # what OpenSlide opens: a file (one instance of a DICOM series)
        self._reopen_lock = threading.Lock()
        try:
            self._osr = openslide.OpenSlide(str(self._source))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"{self.path}: not a slide format OpenSlide reads ({exc})") from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self.path}: OpenSlide cannot open it ({exc})") from exc
        props = self._osr.properties
        self.properties = {key: str(value) for key, value in props.items()}
        self.properties["vendor"] = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self.properties["backend"] = "openslide"
        self.mpp = float(mpp) if mpp is not None else self._scan_mpp(_mpp(props))
        self.objective_power = positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        if self.mpp is not None:
            self.properties["mpp"] = str(self.mpp)
        self._dimensions = tuple(tuple(int(v) for v in dims) for dims in self._osr.level_dimensions)
        self._downsamples = tuple(float(ds) for ds in self._osr.level_downsamples)
        if self.properties["vendor"] == "dicom":
            try:
                _check_dicom_base(self.path, props, self._dimensions[0])
            except SlideError:
                self._osr.close()
                raise

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """As `Slide.read_region`, with OpenSlide placing the level-0 `location` itself."""
        w, h = self._check_region(level, size)
        return self._read(level, (int(location[0]), int(location[1])), w, h)

    def close(self) -> None:
        self._osr.close()

    def _band_height(self, level: int) -> int:
        return 256

    def _reopen(self, failed: openslide.OpenSlide) -> None:
        """OpenSlide's errors are sticky: after one failed read every read of the handle fails. A fresh handle lets
        the rest of the slide be read, as a broken tile of a TIFF spoils only its own patches."""
        with self._reopen_lock:
            if self._osr is failed:
                self._osr = openslide.OpenSlide(str(self._source))
                failed.close()

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        ds = self._downsamples[level]
        return self._read(level, (round(x0 * ds), round(y0 * ds)), w, h)

    def _read(self, level: int, location: tuple[int, int], w: int, h: int) -> np.ndarray:
        handle = self._osr
        try:
            image = handle.read_region(location, level, (w, h))
        except openslide.OpenSlideError as exc:
            self._reopen(handle)
            raise SlideError(f"{self.path}: level {level} at {location} cannot be read ({exc})") from exc
        if image.getchannel("A").getextrema()[0] == 255:  # opaque: PIL drops alpha in C, 4x faster than numpy
            return np.array(image.convert("RGB"))  # writable, as the tifffile backend returns
        rgba = np.asarray(image)
        alpha = rgba[..., 3:4]
        # OpenSlide un-premultiplies: composite over white, as the tifffile backend reads the absent parts
        blended = rgba[..., :3].astype(np.uint16) * alpha + BACKGROUND * (255 - alpha.astype(np.uint16))
        return ((blended + 127) // 255).astype(np.uint8)


def _check_dicom_base(path: Path, props, dimensions: tuple[int, int]) -> None:
    """OpenSlide builds a DICOM pyramid from the instances it finds and skips unreadable ones, so a series missing
    its full-resolution instance opens as a smaller slide at twice the mpp; the level-0 instance says what it is."""
    kind = props.get("dicom.ImageType[0]"), props.get("dicom.ImageType[3]")
    if kind[1] == "RESAMPLED":  # DERIVED\PRIMARY\VOLUME\NONE is a converter's level 0 (OpenSlide's own fixture)
        raise SlideError(
            f"{path}: the DICOM series has no full-resolution instance (the finest one found is "
            f"{'/'.join(filter(None, kind))}, {dimensions[0]} x {dimensions[1]} px): an instance is missing or "
            "unreadable"
        )
    width_mm = positive(props.get("dicom.ImagedVolumeWidth"))
    spacing_mm = positive(props.get("dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]"))
    if width_mm and spacing_mm and abs(width_mm / spacing_mm / dimensions[0] - 1) > 0.02:
        raise SlideError(
            f"{path}: the DICOM series images {width_mm:g} mm across, {width_mm / spacing_mm:.0f} px at its spacing, "
            f"but its finest instance found is {dimensions[0]} px wide: an instance is missing or unreadable"
        )


def _mpp(props) -> float | None:
    return positive(props.get(openslide.PROPERTY_NAME_MPP_X))  # x, as the tifffile backend reads XResolution
