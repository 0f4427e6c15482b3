#!/usr/bin/env bash
# Train the SQG ViT with the DeepSpeed launcher.
#
#   launch/train_vit.sh CONFIG [key=value ...] [-- extra train.py flags]
#   launch/train_vit.sh tiny                                        (CPU: 2 processes, real SQG shards)
#   launch/train_vit.sh sqg128_1.2b parallel.tp=2 parallel.pp=2      (all visible GPUs)
#   HOSTFILE=hosts NUM_GPUS=8 launch/train_vit.sh sqg256_2.5b parallel.tp=4 parallel.pp=4
#   launch/train_vit.sh tiny -- --resume latest
#
# CONFIG is a name in configs/vit/ or a YAML path. Environment:
#   NUM_GPUS     processes per node (default: the visible GPUs; without CUDA, NUM_PROCS or 2)
#   HOSTFILE     DeepSpeed hostfile for multi-node runs ("host slots=N" lines)
#   MASTER_PORT  rendezvous port (default 29500)
#   DS_ENV       extra VAR=value pairs exported to every rank (DeepSpeed's .deepspeed_env)
# Slurm clusters: launch/train_vit.slurm. torchrun works too: torchrun ... megavit/training/train.py CONFIG.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then sed -n '2,17p' "$0"; exit 0; fi
config=$1; shift
[ -f "$config" ] || config=$root/configs/vit/$config.yaml
[ -f "$config" ] || { echo "train_vit.sh: no config '$config' (names: $(cd "$root/configs/vit" && ls *.yaml | sed 's/.yaml//' | tr '\n' ' '))" >&2; exit 2; }
overrides=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then shift; extra=("$@"); break; fi
  overrides+=("$1"); shift
done
bin=$root/.venv/bin
[ -x "$bin/deepspeed" ] || bin=$(dirname "$(command -v deepspeed)")
if "$bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  procs=${NUM_GPUS:-$("$bin/python" -c "import torch; print(torch.cuda.device_count())")}
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  procs=${NUM_GPUS:-${NUM_PROCS:-2}}
fi
if [ -n "${DS_ENV:-}" ]; then tr ' ' '\n' <<<"$DS_ENV" >"$root/.deepspeed_env"; fi
launcher=("$bin/deepspeed" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then launcher+=(--hostfile "$HOSTFILE" --num_gpus "$procs"); else launcher+=(--num_gpus "$procs"); fi
cd "$root"
source "$root/launch/report_errors.sh"
run_reporting_errors "${launcher[@]}" megavit/training/train.py "$config" "${overrides[@]}" "${extra[@]}"
