"""`python -m icmil_pl sweep ...` runs a W&B sweep file offline (icmil_pl.sweep); anything else is the LightningCLI.

Bad input (a config value, a labels CSV, a slide) raises ValueError naming the field or file; from the command line
it ends the run with that one line instead of a traceback through jsonargparse's instantiation.
"""

import sys


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["sweep"]:
            from icmil_pl.sweep import main

            main(sys.argv[2:])
        else:
            from icmil_pl.cli import main

            main()
    except ValueError as error:
        sys.exit(f"error: {' '.join(str(_root_cause(error)).split())}")
