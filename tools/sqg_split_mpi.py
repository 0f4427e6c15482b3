"""Split long SQG netCDF runs into files of a fixed number of frames (megavit.data.split_runs).

    mpiexec -n 4 python tools/sqg_split_mpi.py --input runs/long.nc --length-days 100 --out-dir runs/pieces

Options: --help; details: docs/preprocessing.md.
"""

import sys

from megavit.data.split_runs import main

if __name__ == "__main__":
    sys.exit(main())
