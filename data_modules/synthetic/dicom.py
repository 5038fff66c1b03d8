"""Writing a DICOM WSI series (VL Whole Slide Microscopy Image Storage) from pixels already in hand, so tests make
DICOM slides in code rather than downloading them: one instance per pyramid level, frames tiled TILED_FULL and JPEG
baseline (YBR_FULL_422), as scanners export them and as OpenSlide 4 reads them (a folder of `level_<i>.dcm`).

Files are a pure function of the pixels, `mpp`, `tile`, `quality` and `uid_seed`: UIDs come from the seed, dates are
fixed, so writing the same input twice gives byte-identical files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import ImageCms
from pydicom import Dataset, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from data_modules.io import check

__all__ = ["dicom_from_slide", "write_dicom_wsi"]

_DATE, _TIME = "20000101", "000000"  # fixed, not the write time: two writes of the same input are identical
_SLICE_THICKNESS_MM = 0.004  # a typical 4 um section
_LEVEL0_TYPE = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]  # the ImageType values OpenSlide accepts for levels
_RESAMPLED_TYPE = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _ds(value: float) -> DSfloat:
    """A decimal string of at most 16 characters, as DICOM's DS requires (repr of a float can be longer)."""
    return DSfloat(value, auto_format=True)


@cache
def _srgb_profile() -> bytes:
    """An sRGB ICC profile (colour images must carry one); its creation date is fixed so files stay reproducible."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[24:36] = np.array([2000, 1, 1, 0, 0, 0], ">u2").tobytes()
    return bytes(profile)


def _frames(pixels: np.ndarray, tile: int, quality: int) -> list[bytes]:
    """JPEG-baseline tiles in TILED_FULL order (rows of tiles, left to right); edge tiles padded white."""
    height, width = pixels.shape[:2]
    frames = []
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            block = pixels[y : y + tile, x : x + tile]
            frame[: block.shape[0], : block.shape[1]] = block
            frames.append(
                imagecodecs.jpeg8_encode(
                    frame, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling="422"
                )
            )
    return frames


def _check_levels(levels: Sequence[np.ndarray]) -> list[int]:
    """The integer downsample of each level; a level's sides are level 0's divided by it, rounded either way."""
    check("levels", len(levels) >= 1, "at least one (H, W, 3) array", levels)
    downsamples = []
    h0, w0 = levels[0].shape[:2]
    for i, level in enumerate(levels):
        shape_ok = isinstance(level, np.ndarray) and level.dtype == np.uint8 and level.ndim == 3
        check(f"levels[{i}]", shape_ok and level.shape[2] == 3 and min(level.shape[:2]) >= 1, "(H, W, 3) uint8", level)
        h, w = level.shape[:2]
        d = max(1, round(w0 / w))
        fits = all(side in (n // d, -(-n // d)) for side, n in ((w, w0), (h, h0)))
        check(f"levels[{i}]", fits, f"level 0 ({w0}x{h0}) / an integer downsample", f"{w}x{h}")
        check(f"levels[{i}]", not downsamples or d > downsamples[-1], "coarser than the level before", f"{w}x{h}")
        downsamples.append(d)
    return downsamples


def _instance(
    pixels: np.ndarray,
    level: int,
    downsample: int,
    mpp: float,
    size0: tuple[int, int],
    tile: int,
    quality: int,
    uid: Callable[..., str],
) -> Dataset:
    """One pyramid level as a complete VL Whole Slide Microscopy image (DICOM PS3.3 A.32.8)."""
    height, width = pixels.shape[:2]
    frames = _frames(pixels, tile, quality)
    image_type = _LEVEL0_TYPE if level == 0 else _RESAMPLED_TYPE
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid("instance", level)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    # SOP common, patient, study, series, frame of reference, equipment
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = uid("instance", level)
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = _DATE, _TIME, _DATE, _TIME
    ds.AcquisitionDateTime = _DATE + _TIME
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", ""
    ds.Modality = "SM"
    ds.Manufacturer, ds.ManufacturerModelName = "icmil-pl", "synthetic"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0", "data_modules.synthetic.dicom"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Slide", "synthetic", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.SeriesNumber, ds.InstanceNumber = 1, level + 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uid("frame of reference"), "SLIDE_CORNER"
    # specimen
    ds.ContainerIdentifier = "synthetic"
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    ds.SpecimenDescriptionSequence = [
        _item(
            SpecimenIdentifier="synthetic",
            SpecimenUID=uid("specimen"),
            IssuerOfTheSpecimenIdentifierSequence=[],
            SpecimenPreparationSequence=[],
        )
    ]
    ds.AcquisitionContextSequence = []
    # whole slide microscopy image: the level's place in the pyramid and on the slide
    ds.ImageType = image_type
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=uid("dimension organization"))]
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.ImagedVolumeWidth = _ds(size0[0] * mpp / 1000)
    ds.ImagedVolumeHeight = _ds(size0[1] * mpp / 1000)
    ds.ImagedVolumeDepth = _ds(_SLICE_THICKNESS_MM * 1000)  # um, unlike width and height (mm)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = width, height, 1
    ds.TotalPixelMatrixOriginSequence = [
        _item(XOffsetInSlideCoordinateSystem=_ds(0), YOffsetInSlideCoordinateSystem=_ds(0))
    ]
    ds.SpecimenLabelInImage, ds.BurnedInAnnotation, ds.FocusMethod = "NO", "NO", "AUTO"
    ds.ExtendedDepthOfField, ds.VolumetricProperties = "NO", "VOLUME"
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = [
        _item(
            OpticalPathIdentifier="1",
            IlluminationColorCodeSequence=[_code("414298005", "SCT", "Full Spectrum")],
            IlluminationTypeCodeSequence=[_code("111744", "DCM", "Brightfield illumination")],
            ICCProfile=_srgb_profile(),
        )
    ]
    spacing = _ds(mpp * downsample / 1000)  # mm per pixel, (row, column); OpenSlide's openslide.mpp-x/y
    ds.SharedFunctionalGroupsSequence = [
        _item(
            PixelMeasuresSequence=[_item(PixelSpacing=[spacing, spacing], SliceThickness=_ds(_SLICE_THICKNESS_MM))],
            WholeSlideMicroscopyImageFrameTypeSequence=[_item(FrameType=image_type)],
            OpticalPathIdentificationSequence=[_item(OpticalPathIdentifier="1")],
        )
    ]
    # image pixel: the frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(frames), tile, tile
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.LossyImageCompressionRatio = _ds(round(len(frames) * tile * tile * 3 / sum(map(len, frames)), 2))
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def write_dicom_wsi(
    folder: str | os.PathLike,
    levels: Sequence[np.ndarray],
    mpp: float,
    *,
    tile: int = 256,
    quality: int = 95,
    uid_seed: str | int = 0,
) -> list[Path]:
    """Write one DICOM instance per pyramid level (finest first, each an (H, W, 3) uint8 array, each level an integer
    downsample of level 0) into `folder` as level_<i>.dcm; returns the files.

    All levels share study, series and frame-of-reference UIDs, derived from `uid_seed`: OpenSlide gathers a slide's
    levels by series UID from every DICOM file in the folder, so two series written with the same seed into one folder
    would merge. `mpp` is level 0's microns per pixel; `tile` the frame side; `quality` the JPEG quality."""
    check("mpp", isinstance(mpp, (int, float)) and mpp > 0, "a positive number of microns per pixel", mpp)
    check("tile", isinstance(tile, int) and tile >= 16 and tile % 16 == 0, "a multiple of 16", tile)
    check("quality", isinstance(quality, int) and 1 <= quality <= 100, "an int in 1..100", quality)
    downsamples = _check_levels(levels)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def uid(*what: object) -> str:
        return generate_uid(entropy_srcs=["icmil-pl synthetic DICOM WSI", repr(uid_seed), *map(str, what)])

    size0 = (levels[0].shape[1], levels[0].shape[0])
    paths = []
    for i, (pixels, downsample) in enumerate(zip(levels, downsamples, strict=True)):
        ds = _instance(pixels, i, downsample, float(mpp), size0, tile, quality, uid)
        path = folder / f"level_{i}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def dicom_from_slide(
    slide_path: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    tile: int = 256,
    quality: int = 95,
    uid_seed: str | int | None = None,
) -> list[Path]:
    """The same pixels as an existing pyramidal TIFF/SVS slide, as a DICOM WSI series in `folder` (see
    `write_dicom_wsi`), so one synthetic slide can be tested in both formats. Each level is read whole: for small
    slides. `uid_seed` defaults to the slide's file name, so different slides get different series."""
    from data_modules.slides import open_slide  # the slide readers load only when a slide is converted

    slide_path = Path(slide_path)
    with open_slide(slide_path) as slide:
        mpp = slide.require_mpp()
        levels = [slide.read_region((0, 0), i, slide.level_dimensions[i]) for i in range(slide.level_count)]
    seed = slide_path.name if uid_seed is None else uid_seed
    return write_dicom_wsi(folder, levels, mpp, tile=tile, quality=quality, uid_seed=seed)
