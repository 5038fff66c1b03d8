"""`python -m icmil_pl sweep ...` runs a W&B sweep file offline (icmil_pl.tools.sweep), `report <run>` writes a run's
report.html (icmil_pl.views.report), `view <run>` serves its slides to a browser (icmil_pl.views.viewer); anything
else is the LightningCLI.

Bad input (a config value, a labels CSV, a slide) raises ValueError naming the field or file, and an unwritable or
missing path raises OSError; from the command line either ends the run with one line instead of a traceback through
jsonargparse's instantiation.
"""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path

# The commands that are not LightningCLI subcommands, and the module whose `main(argv)` runs each.
COMMANDS = {"sweep": "icmil_pl.tools.sweep", "report": "icmil_pl.views.report", "view": "icmil_pl.views.viewer"}

_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("icmil_pl", "data_modules"))


def _chain(error: BaseException):
    """`error` and what caused it, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _raised_here(error: BaseException) -> bool:
    """Whether our own code raised `error` (its innermost frame is in icmil_pl or data_modules)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGES)


def message(error: BaseException) -> str:
    """One line for `error`: the outermost of our own errors in its chain (it names the file or field; what it wraps,
    such as a decoder's `not a TIFF file`, does not), else the innermost cause (jsonargparse's own checks)."""
    chain = list(_chain(error))
    ours = next((e for e in chain if _raised_here(e) and isinstance(e, ValueError | OSError)), None)
    chosen = ours or chain[-1]
    if isinstance(chosen, OSError) and chosen.filename is not None:
        text = f"{chosen.filename}: {chosen.strerror or chosen}"
    else:
        text = str(chosen)
    return f"error: {' '.join(text.split())}"


def main() -> None:
    try:
        command = COMMANDS.get(sys.argv[1] if len(sys.argv) > 1 else "")
        if command is not None:
            import_module(command).main(sys.argv[2:])
        else:
            from icmil_pl.cli import main as cli

            cli()
    except (ValueError, OSError) as error:
        sys.exit(fresh_line() + message(error))


def fresh_line() -> str:
    """A newline before the error on a terminal: a progress bar may have left the cursor mid-line."""
    return "\n" if sys.stderr.isatty() else ""


if __name__ == "__main__":
    main()
