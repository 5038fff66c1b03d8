"""`python -m data_modules.synthetic ROOT [options]`: write a synthetic cohort; one option per `CohortSpec` field."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path

from . import __doc__ as package_doc
from .cohort import make_cohort
from .spec import CohortSpec


def _option(parser: argparse.ArgumentParser, field: dataclasses.Field, hint: object) -> None:
    """`--field-name` typed from the field's annotation: Literal -> choices, tuple[x, x] -> 2 values, tuple[x, ...]
    -> 1 or more."""
    kwargs: dict = {"default": field.default, "help": f"{field.metadata['help']} (default: %(default)s)"}
    if "metavar" in field.metadata:
        kwargs["metavar"] = field.metadata["metavar"]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        kwargs["nargs"] = "+" if args[-1] is Ellipsis else len(args)
        hint = args[0]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        kwargs["choices"] = args
    else:
        kwargs["type"] = hint
    parser.add_argument(f"--{field.name.replace('_', '-')}", **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_modules.synthetic", description=package_doc.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    hints = typing.get_type_hints(CohortSpec)
    for field in dataclasses.fields(CohortSpec):
        _option(parser, field, hints[field.name])
    parser.add_argument("--workers", type=int, default=1, help="threads compressing tiles (default: %(default)s)")
    args = vars(parser.parse_args(argv))
    root, workers = args.pop("root"), args.pop("workers")
    try:
        spec = CohortSpec(**args)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    make_cohort(root, spec, workers=workers)
    print(f"{root}: {spec.n_slides} slides in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
