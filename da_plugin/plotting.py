"""Figures of DA runs (matplotlib, no display needed) and the variance spectrum they show.

Every figure is published with :func:`save_figure`, atomically: a reader finds the previous PNG
or the complete new one. ``da-cycle`` draws one run's scores (:func:`plot_error_series`);
``plot-results`` (:mod:`da_plugin.plot_results`) compares runs (:func:`plot_run_comparison`) and
draws fields on a grid (:func:`plot_fields`, :func:`plot_spectra`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from megavit.atomic import atomic_path  # noqa: E402

DPI = 110


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically, and free it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)


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
    save_figure(fig, path)


@dataclass(frozen=True)
class RunSeries:
    """One run's analysis scores over time, as the comparison figure draws them (all ``[T]``)."""

    label: str
    time: np.ndarray
    rmse: np.ndarray
    spread: np.ndarray
    free: np.ndarray | None  # free-run RMSE; None when the run has no free ensemble


def plot_run_comparison(path: Path, runs: Sequence[RunSeries], time_label: str, error_label: str) -> None:
    """Every run's analysis RMSE (solid), spread (dashed) and free-run RMSE (dotted) over time,
    one colour per run (the SC24 paper's Fig. 4)."""
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        ax.plot(run.time, run.rmse, color=colour, lw=1.4, label=f"{run.label} RMSE")
        ax.plot(run.time, run.spread, color=colour, lw=1.0, ls="--", label=f"{run.label} spread")
        if run.free is not None:
            ax.plot(run.time, run.free, color=colour, lw=1.0, ls=":", label=f"{run.label} free run")
    ax.set_ylim(bottom=0)
    ax.set_xlabel(time_label)
    ax.set_ylabel(error_label)
    ax.set_title("analysis RMSE (solid), spread (dashed), free-run RMSE (dotted)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    save_figure(fig, path)


def plot_fields(path: Path, truth: np.ndarray, analysis: np.ndarray, title: str, units: str) -> None:
    """Truth, analysis mean and their difference, one row per level (fields ``[levels, ny, nx]``);
    truth and analysis share a colour scale per level so they can be compared by eye."""
    levels = truth.shape[0]
    fig, axes = plt.subplots(levels, 3, figsize=(12, 3.6 * levels), constrained_layout=True, squeeze=False)
    for level in range(levels):
        low = min(truth[level].min(), analysis[level].min())
        high = max(truth[level].max(), analysis[level].max())
        error = analysis[level] - truth[level]
        largest = float(np.abs(error).max()) or 1.0
        panels = [("truth", truth[level], "viridis", low, high),
                  ("analysis mean", analysis[level], "viridis", low, high),
                  ("analysis - truth", error, "RdBu_r", -largest, largest)]
        for ax, (name, field, cmap, vmin, vmax) in zip(axes[level], panels, strict=True):
            image = ax.imshow(field, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(f"level {level}: {name}", fontsize="medium")
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(image, ax=ax, shrink=0.85, label=units)
    fig.suptitle(title)
    save_figure(fig, path)


def isotropic_spectrum(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variance spectrum of periodic 2-D fields ``[..., ny, nx]``, binned by wavenumber magnitude.

    Returns ``(k [K], E [..., K])``: E(k) sums |f_hat|^2 over the Fourier modes whose |k| (in
    cycles per domain, rounded) is k, with f_hat = fft2(f) / (ny nx). So sum_k E(k) = mean(f^2)
    (Parseval), and A cos(k.x) puts A^2 / 2 at |k|. For theta on an SQG lid this is the theta
    variance spectrum.
    """
    ny, nx = field.shape[-2:]
    power = np.abs(np.fft.fft2(field, norm="forward")) ** 2
    ky = np.fft.fftfreq(ny, d=1.0 / ny)
    kx = np.fft.fftfreq(nx, d=1.0 / nx)
    shell = np.rint(np.hypot(ky[:, None], kx[None, :])).astype(int).ravel()  # [ny nx]: each mode's |k|
    size = shell.max() + 1
    rows = power.reshape(-1, ny * nx)
    spectrum = np.stack([np.bincount(shell, weights=row, minlength=size) for row in rows])
    return np.arange(size), spectrum.reshape(*power.shape[:-2], size)


def plot_spectra(path: Path, k: np.ndarray, spectra: Mapping[str, np.ndarray], title: str, ylabel: str) -> None:
    """Log-log spectra ``{name: [levels, K]}`` over wavenumbers ``k`` ``[K]``, one panel per level;
    the first is drawn solid black (the truth), the others dashed and dotted."""
    levels = next(iter(spectra.values())).shape[0]
    fig, axes = plt.subplots(1, levels, figsize=(5 * levels, 4), constrained_layout=True, squeeze=False)
    for level, ax in enumerate(axes[0]):
        for (name, spectrum), style in zip(spectra.items(), ("k-", "C0--", "C3:"), strict=False):
            ax.loglog(k, spectrum[level], style, label=name)
        ax.set_title(f"level {level}")
        ax.set_xlabel("wavenumber (cycles per domain)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    save_figure(fig, path)
