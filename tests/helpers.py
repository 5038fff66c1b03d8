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


def assert_same_chunked_gradients(embedder, head, loss, runs) -> None:
    """`bag_backward` of each (patches, chunk_size) in `runs` leaves the same gradients in embedder and head."""
    import itertools

    import torch

    from icmil_pl.chunked import bag_backward

    grads = []
    for patches, chunk in runs:
        embedder.zero_grad()
        head.zero_grad()
        bag_backward(embedder, loss, patches, chunk)
        grads.append([p.grad.clone() for p in itertools.chain(embedder.parameters(), head.parameters())])
    for first, other in itertools.pairwise(grads):
        for a, b in zip(first, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def lenet_end_to_end(chunk_size: int) -> list[str]:
    """The model arguments of a tiny end-to-end model: a 32 px LeNet (500-d) under a small ABMIL, chunked."""
    return [
        "--model=EndToEndMIL",
        "--model.embedder=LeNetEmbedder",
        "--model.embedder.image_size=32",
        "--model.aggregator=ABMIL",
        "--model.aggregator.in_dim=500",
        "--model.aggregator.hidden_dim=32",
        f"--model.chunk_size={chunk_size}",
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
