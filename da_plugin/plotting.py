"""Figures of DA runs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_error_series(path: Path, time: np.ndarray, series: dict[str, np.ndarray], title: str,
                      burn_in_time: float | None = None) -> None:
    """Line plot of RMSE/spread time series, log-scaled, with the burn-in shaded."""
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    for label, values in series.items():
        ax.plot(time, values, label=label, lw=1.2)
    if burn_in_time is not None:
        ax.axvspan(time[0], burn_in_time, color="0.9", label="burn-in")
    ax.set_yscale("log")
    ax.set_xlabel("model time")
    ax.set_ylabel("RMSE / spread")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
