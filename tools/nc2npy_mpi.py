"""Convert SQG netCDF runs into .npy training shards, statistics and meta.json (megavit.data.preprocess).

    mpiexec -n 4 python tools/nc2npy_mpi.py --input runs/sqg64/ --out-dir data/sqg64 \\
        --start_train_day 100 --start_val_day 900 --start_test_day 950 --end_day 1000 --num_shards 8

Options: --help; layout, day rules and errors: docs/preprocessing.md.
"""

import sys

from megavit.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
