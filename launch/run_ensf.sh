#!/usr/bin/env bash
# Run the decomposed EnSF twin experiment (python -m da_plugin.scale) on one node.
#
#   launch/run_ensf.sh [-n RANKS] [-l torchrun|mpiexec] [CONFIG] [key=value ...]
#   launch/run_ensf.sh -n 4 configs/da/l96_ensf_scale.yaml model.dim=10000000 cycles=20
#
# GPUs: one rank per GPU (RANKS defaults to the visible GPU count). CPU: RANKS defaults to 1 and
# each rank gets cores/RANKS threads. Multi-node runs: launch/ensf_scaling.slurm (srun).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}
launcher=torchrun
ranks=
while getopts "n:l:h" opt; do
  case $opt in
    n) ranks=$OPTARG ;;
    l) launcher=$OPTARG ;;
    h) sed -n '2,9p' "$0"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
config=${1:-$here/configs/da/l96_ensf_scale.yaml}
[ $# -gt 0 ] && shift
if [ -z "$ranks" ]; then
  ranks=$("$python" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))}
fi
source "$here/launch/report_errors.sh"
case $launcher in
  torchrun) run_reporting_errors "$python" -m torch.distributed.run --standalone --nproc_per_node "$ranks" \
              -m da_plugin.scale "$config" "$@" ;;
  mpiexec)  mpiexec_bin=$(dirname "$python")/mpiexec; [ -x "$mpiexec_bin" ] || mpiexec_bin=mpiexec
            root_flags=$([ "$(id -u)" = 0 ] && echo "--allow-run-as-root --oversubscribe" || true)
            run_reporting_errors "$mpiexec_bin" $root_flags -n "$ranks" "$python" -m da_plugin.scale "$config" "$@" ;;
  *) echo "run_ensf.sh: unknown launcher '$launcher' (torchrun or mpiexec)" >&2; exit 2 ;;
esac
