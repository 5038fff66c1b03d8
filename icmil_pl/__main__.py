"""`python -m icmil_pl sweep ...` runs a W&B sweep file offline (icmil_pl.sweep); anything else is the LightningCLI."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        from icmil_pl.sweep import main

        main(sys.argv[2:])
    else:
        from icmil_pl.cli import main

        main()
