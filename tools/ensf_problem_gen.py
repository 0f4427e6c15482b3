"""Generate a sharded Lorenz-96 EnSF problem (truth and observations) for ``python -m da_plugin.scale``.

    python tools/ensf_problem_gen.py --dim 1000000 --steps 10 --out problems/l96_1e6
    torchrun --nproc_per_node 8 tools/ensf_problem_gen.py --dim 100000000 --steps 100 --out problems/l96_1e8
    mpiexec -n 8 python tools/ensf_problem_gen.py --dim 100000000 --steps 100 --out problems/l96_1e8

A thin command-line shim: the arguments and the generator live in da_plugin.scale.problem_gen,
the directory format in da_plugin.scale.problem.
"""

import sys

from da_plugin.scale.problem_gen import main

if __name__ == "__main__":
    sys.exit(main())
