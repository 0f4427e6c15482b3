"""SQG truth runs with the torch model, written as sqgturb-style netCDF (da_plugin.models.sqg_truth).

    .venv/bin/python tools/sqg_generate.py --preset 64 --days 300 --out runs/sqg_N64.nc
    .venv/bin/python tools/sqg_generate.py --preset 64 --days 600 --out runs/sqg_N64.nc --resume
    .venv/bin/python tools/sqg_generate.py --diagnose runs/sqg_N64.nc --from-day 50 --plot ke.png

Options: --help; file layout: docs/sqg.md.
"""

import sys

from da_plugin.models.sqg_truth import main

if __name__ == "__main__":
    sys.exit(main())
