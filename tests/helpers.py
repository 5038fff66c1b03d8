"""What several test files share that is not a fixture: the ICMIL test cohort's spec and its command line."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_modules.synthetic import CohortSpec

CONF = Path(__file__).parent / "conf"

# The cohort of the ICMIL command-line tests: 12 slides of 9 patients, 1024 px at 0.5 um/px, tumour foci easy to see
# (contrast 1.0) and large (10-20 % of the tissue), so two tiny ICMIL iterations finish in seconds.
ICMIL_COHORT = CohortSpec(n_slides=12, seed=2, size=(1024, 1024), tumour_contrast=1.0, tumour_area=(0.1, 0.2))


def icmil_args(cohort: Path, out: Path, subcommand: str = "fit", *extra: str) -> list[str]:
    """`tests/conf/icmil.yaml` on `cohort`, every output under `out`."""
    return [
        subcommand,
        "-c",
        str(CONF / "icmil.yaml"),
        f"--model.init_args.run_dir={out / 'run'}",
        f"--data.init_args.labels={cohort / 'labels.csv'}",
        f"--data.init_args.slides={cohort / 'slides'}",
        f"--data.init_args.grid_cache={out / 'grids'}",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
        *extra,
    ]


def write_labels(
    path: Path, rows: Iterable[Sequence], header: Sequence[str] = ("slide_id", "label", "patient_id")
) -> Path:
    """A labels CSV with `header` and `rows`, at `path`."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def break_level0_tiles(path: Path) -> None:
    """Zero the first bytes of every level-0 tile of a TIFF slide: each fails to decode ('Not a JPEG file'), while
    the lower levels, which tissue detection reads, stay intact."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset : offset + min(count, 16)] = bytes(min(count, 16))
    path.write_bytes(bytes(data))
