"""Compare EnSF and LETKF on Lorenz-96 with linear and with strongly nonlinear observations.

Run:  .venv/bin/python bench/da_compare.py            (add --help for options)

The SC24 EnSF paper's finding: the LETKF wins with linear Gaussian observations (identity
operator), EnSF with arctan observations. Every case shares the truth, observation noise and
initial ensemble (same seed): Lorenz-96 (F = 8, dt = 0.005 RK4), an analysis every ``--every``
model steps (default 1), every variable observed; EnSF uses the published setting (one_to_one prior, K steps,
eps_alpha 0.05, eps_beta 0, linear damping). Each run goes through ``da_plugin.cycle.run`` into
``OUTPUT_DIR/<obs>_<filter>``; the table, ``da_compare.json`` and ``da_compare.png`` go into
OUTPUT_DIR. A run that diverges (NaN/inf) is reported as "diverged" instead of stopping the rest.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from da_plugin.cycle import CycleConfig, run  # noqa: E402
from megavit.config import build  # noqa: E402

OBS_TYPES = {"linear": "identity", "arctan": "arctan"}
FILTER_NAMES = ("ensf", "letkf")
COLUMNS = ("rmse_a", "rmse_f", "spread_a", "rmse_free", "seconds_per_cycle")


def case_config(args: argparse.Namespace, obs_type: str, filter_name: str) -> CycleConfig:
    """The CycleConfig of one (observation type, filter) case."""
    if filter_name == "ensf":
        filt = {"name": "ensf", "steps": args.ensf_steps, "eps_alpha": 0.05, "eps_beta": 0.0,
                "damping": "linear", "prior_score": "one_to_one"}
    else:
        filt = {"name": "letkf", "inflation": args.letkf_inflation, "localization_radius": args.letkf_radius}
    sigma = args.linear_sigma if obs_type == "linear" else 0.05
    return build(CycleConfig, {
        "seed": args.seed, "cycles": args.cycles, "burn_in": args.burn_in,
        "output_dir": str(Path(args.output_dir) / f"{obs_type}_{filter_name}"),
        "save_fields": False, "progress": False, "dtype": "float64",
        "model": {"name": "lorenz96", "dim": args.dim, "forcing": 8.0, "dt": 0.005},
        "obs": {"operator": OBS_TYPES[obs_type], "sigma": sigma, "every": args.every, "stride": 1},
        "filter": {**filt, "ensemble_size": args.members},
    })


def run_case(config: CycleConfig) -> dict[str, Any] | None:
    """The run's summary, or None when the filter diverged."""
    try:
        return run(config)
    except (FloatingPointError, ValueError) as err:
        print(f"  diverged: {err}", flush=True)
        return None


def plot(results: dict[str, dict[str, dict[str, Any] | None]], path: Path) -> None:
    """Grouped bars of rmse_a per observation type, with rmse_free as a reference marker."""
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(FILTER_NAMES)
    for j, name in enumerate(FILTER_NAMES):
        xs = [i + (j - (len(FILTER_NAMES) - 1) / 2) * width for i in range(len(OBS_TYPES))]
        values = [(s or {}).get("rmse_a", math.nan) for s in (results[o][name] for o in OBS_TYPES)]
        ax.bar(xs, values, width, label=name.upper())
    free = [next((s["rmse_free"] for s in results[o].values() if s), math.nan) for o in OBS_TYPES]
    ax.hlines(free, [i - 0.45 for i in range(len(free))], [i + 0.45 for i in range(len(free))],
              colors="k", linestyles="--", label="free run (no DA)", zorder=3)
    ax.set_xticks(range(len(OBS_TYPES)), list(OBS_TYPES))
    ax.set_yscale("log")
    ax.set_ylabel("time-mean analysis RMSE")
    ax.set_title("EnSF vs LETKF on Lorenz-96")
    ax.legend(ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=100, help="Lorenz-96 state size d")
    parser.add_argument("--cycles", type=int, default=400, help="analysis cycles per run")
    parser.add_argument("--burn-in", type=int, default=100, help="leading cycles left out of the time means")
    parser.add_argument("--members", type=int, default=20, help="ensemble size N (both filters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/da_compare")
    parser.add_argument("--linear-sigma", type=float, default=1.0, help="obs error std of the linear case")
    parser.add_argument("--letkf-inflation", type=float, default=1.02, help="LETKF prior inflation rho")
    parser.add_argument("--letkf-radius", type=float, default=5.0, help="LETKF localization radius (grid units)")
    parser.add_argument("--every", type=int, default=1, help="model steps between analyses")
    parser.add_argument("--ensf-steps", type=int, default=100, help="EnSF reverse-SDE steps K")
    args = parser.parse_args()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any] | None]] = {o: {} for o in OBS_TYPES}
    for obs_type in OBS_TYPES:
        for name in FILTER_NAMES:
            print(f"running {obs_type} / {name} ...", flush=True)
            results[obs_type][name] = run_case(case_config(args, obs_type, name))

    print(f"\nLorenz-96 d={args.dim}, N={args.members}, {args.cycles} cycles (burn-in {args.burn_in}), "
          f"seed {args.seed}; sigma linear={args.linear_sigma}, arctan=0.05")
    print(f"{'obs':<7} {'filter':<6} " + " ".join(f"{c:>17}" for c in COLUMNS))
    for obs_type, runs in results.items():
        for name, s in runs.items():
            cells = [f"{s[c]:>17.4g}" for c in COLUMNS] if s else [f"{'diverged':>17}"] * len(COLUMNS)
            print(f"{obs_type:<7} {name:<6} " + " ".join(cells))
    for obs_type, runs in results.items():
        ok = {n: s["rmse_a"] for n, s in runs.items() if s and math.isfinite(s["rmse_a"])}
        winner = min(ok, key=ok.get) if ok else None
        print(f"{obs_type}: " + (f"{winner.upper()} wins (rmse_a " + ", ".join(
            f"{n} {v:.4g}" for n, v in ok.items()) + ")" if winner else "all filters diverged"))

    (out / "da_compare.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    plot(results, out / "da_compare.png")
    print(f"outputs in {out.resolve()}")


if __name__ == "__main__":
    main()
