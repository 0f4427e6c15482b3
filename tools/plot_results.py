"""Compare da-cycle runs: RMSE/spread over time, maps and spectra on grids, a table (da_plugin.plot_results).

    python tools/plot_results.py runs/sqg_ensf runs/sqg_letkf --labels EnSF,LETKF --out figures
    plot-results --help                              (the same, as an installed console script)
"""

import sys

from da_plugin.plot_results import main

if __name__ == "__main__":
    sys.exit(main())
