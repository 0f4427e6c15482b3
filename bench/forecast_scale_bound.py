"""Which scales a forecast must get right to reach a given fraction of persistence's error.

    .venv/bin/python bench/forecast_scale_bound.py --shards runs/demo/shards [--split test] [--lead-hours 12]

For every pair of frames ``lead`` apart in a split of a shard directory, two idealized forecasts
are scored against the later frame: the later frame itself at every horizontal wavenumber with
|k| <= K (a forecast perfect at those scales) and, above K, persistence (the earlier frame's
Fourier coefficients), the split's time mean (a climatological, fully damped forecast of the small
scales) or the best damped persistence: the time mean plus a times the earlier frame's anomaly,
with one least-squares a per integer shell of |k| fitted on these very pairs (so optimistic).
RMSE pools both levels and all grid points, as ``evaluate-surrogate`` does; the table prints it
for a range of K with its ratio to persistence's RMSE.

It bounds what a surrogate of a given resolution can reach: the demo ViT (patch 8 on 64^2) has an
8 x 8 token grid, whose Nyquist wavenumber is 4; the published DA ViT (patch 2) 32 x 32, Nyquist 16.
A forecast needs to be right up to the K whose row reaches the target ratio, and no forecast at
those scales is better than perfect.
"""

from __future__ import annotations

import argparse

import numpy as np

from da_plugin.surrogate_eval import shard_source
from megavit.config import number
from megavit.data.shards import SPLITS


def rmse(error: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(error, dtype=np.float64))))


def damped_persistence(spectra: dict[str, np.ndarray], shell: np.ndarray) -> np.ndarray:
    """Fourier coefficients of mean + a (start - mean), a fitted per wavenumber shell to the later frames."""
    anomaly, target = spectra["start"] - spectra["mean"], spectra["later"] - spectra["mean"]
    covariance = np.bincount(shell.ravel(), (np.real(target * anomaly.conj())).sum((0, 1)).ravel())
    variance = np.bincount(shell.ravel(), (np.abs(anomaly) ** 2).sum((0, 1)).ravel())
    factor = covariance / np.maximum(variance, np.finfo(float).tiny)
    return spectra["mean"] + factor[shell] * anomaly


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="a shard directory (tools/nc2npy_mpi.py)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--lead-hours", type=number(float, gt=0), default=12.0, help="forecast lead time")
    parser.add_argument("--wavenumbers", type=number(int, ge=0), nargs="+", default=[2, 4, 6, 8, 12, 16, 24, 32],
                        help="the cut-offs K (|k| in grid wavenumbers)")
    args = parser.parse_args()
    source = shard_source(args.shards, args.split)
    lead = round(args.lead_hours * 3600.0 / source.step_seconds)
    if lead < 1 or abs(lead * source.step_seconds - args.lead_hours * 3600.0) > 1e-6 * source.step_seconds:
        parser.error(f"--lead-hours {args.lead_hours} is not a whole number of the frames' "
                     f"{source.step_seconds / 3600:g} h")
    if source.count <= lead:
        parser.error(f"{source.name} has {source.count} frames, fewer than a lead of {lead} + 1")
    frames = source.read(np.arange(source.count))  # [T, levels, ny, nx]
    start, later = frames[:-lead], frames[lead:]
    persistence = rmse(later - start)
    spectra = {name: np.fft.fft2(field) for name, field in (("start", start), ("later", later),
                                                           ("mean", frames.mean(0, keepdims=True)))}
    ny, nx = frames.shape[-2:]
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(ny, 1 / ny), np.fft.fftfreq(nx, 1 / nx), indexing="ij"))
    spectra["damped"] = damped_persistence(spectra, np.rint(radius).astype(int))
    print(f"{source.name}: {len(start)} pairs {args.lead_hours:g} h apart; persistence RMSE {persistence:.2f}, "
          f"time-mean (climatology) RMSE {rmse(later - frames.mean(0)):.2f}")
    print("| perfect up to abs(k) <= K | persistence above K | ratio | climatology above K | ratio "
          "| best damped persistence above K | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cutoff in args.wavenumbers:
        resolved = radius <= cutoff
        errors = [rmse(later - np.real(np.fft.ifft2(np.where(resolved, spectra["later"], spectra[rest]))))
                  for rest in ("start", "mean", "damped")]
        print(f"| {cutoff} | " + " | ".join(f"{error:.2f} | {error / persistence:.2f}" for error in errors) + " |")


if __name__ == "__main__":
    main()
