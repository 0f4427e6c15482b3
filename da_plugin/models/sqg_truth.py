"""SQG truth runs with the torch model, written as sqgturb-style netCDF; resumable; diagnostics.

The library behind ``tools/sqg_generate.py``; run (from the repository root):
    .venv/bin/python tools/sqg_generate.py --preset 64 --days 300 --out runs/sqg_N64.nc
    .venv/bin/python tools/sqg_generate.py --preset 64 --days 600 --out runs/sqg_N64.nc --resume
    .venv/bin/python tools/sqg_generate.py --diagnose runs/sqg_N64.nc --from-day 50 --plot ke.png

A run integrates ``--members`` states (jet + seeded noise, member i the i-th draw of one
generator) as one batch: ``--spinup-days`` unsaved, then ``--days`` with a frame every
``--output-interval-hours`` (frames at the end of the spin-up through the last day). Each member
goes to its own file, ``OUT`` or, for several, ``OUT`` with ``_m000``, ``_m001``, ... before the
suffix, holding ``pv(t, z, y, x)`` float32 (potential-temperature anomaly in K), coordinates
``x``, ``y``, ``z`` (m) and ``t`` (seconds of model time since the initial state) and the model
parameters as global attributes. By default the dynamics are sqgturb's (its 2.25x Jacobian, see
docs/sqg.md) so the data match what the SC24 paper trained on; ``--correct-jacobian`` opts out.

The files are in megavit.data.sqg_netcdf's format, netCDF-3 (64-bit offset): a frame is
appended and synced, and an interrupted write leaves the header's record count at the last
complete frame, so the file always reads. The exact model state (in the run's dtype) sits beside
the files in ``OUT.restart.npz``, replaced atomically; ``--resume`` checks that files and restart
match the requested run, then continues bit for bit on the same device (a larger ``--days``
extends a finished run). ``--diagnose`` prints the time-mean spatial std of theta at each level
and the kinetic-energy spectrum slope. From Python, ``run(Plan(...), device, resume, progress)``
makes a run without the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from da_plugin.models.sqg import PRESETS, SQG, invert
from megavit.atomic import atomic_file
from megavit.config import DTYPES, number
from megavit.data.sqg_netcdf import DAY, FrameReader, InputError, RunWriter, Timeline, check_run, create_run, open_run
from megavit.inference import check_device

TITLE = "SQG turbulence truth run (da_plugin.models.sqg)"
COMMAND = "tools/sqg_generate.py"  # the documented command, recorded in each file's history
RESTART_EVERY_SECONDS = 10.0  # wall-clock spacing of restart writes (a resume redoes at most this)
SLOPE_RANGE = (8, 24)  # wavenumber shells of the fitted kinetic-energy spectrum slope


@dataclasses.dataclass(frozen=True)
class Plan:
    """One truth run: the model, the schedule in model steps and the members' files."""

    model: SQG
    seed: int
    members: int
    dtype: str
    interval_steps: int  # model steps between frames (and between restart opportunities)
    spinup_events: int  # intervals before the first frame
    frames: int  # frames per member file
    paths: tuple[Path, ...]
    restart: Path

    @property
    def interval(self) -> float:
        return self.interval_steps * self.model.dt

    def identity(self) -> dict[str, Any]:
        """What must match between a file and a resumed run (everything but the run length)."""
        params = {k: (int(v) if isinstance(v, bool) else v) for k, v in dataclasses.asdict(self.model).items()}
        return {**params, "seed": self.seed, "members": self.members, "dtype": self.dtype,
                "output_interval": self.interval, "spinup": self.spinup_events * self.interval}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="See the module docstring and docs/sqg.md for the file layout.")
    parser.add_argument("--preset", type=int, default=64, choices=sorted(PRESETS),
                        help="resolution N; sets sqgturb's dt and diff_efold for it (default 64)")
    parser.add_argument("--days", type=number(float, gt=0), default=300.0,
                        help="days saved after the spin-up (default 300)")
    parser.add_argument("--spinup-days", type=number(float, ge=0), default=100.0,
                        help="days run before the first frame (default 100)")
    parser.add_argument("--output-interval-hours", type=number(float, gt=0), default=3.0,
                        help="hours between frames (default 3, as sqgturb; the coupled DA cycles every 12)")
    parser.add_argument("--dt", type=number(float, gt=0),
                        help="time step (s) instead of the preset's (it must divide the output interval); "
                        "e.g. 600 at 64^2 if sqgturb's 1200 s breaks RK4 stability, see docs/sqg.md")
    parser.add_argument("--seed", type=number(int, ge=0), default=0, help="seed of the initial noise (default 0)")
    parser.add_argument("--members", type=number(int, ge=1), default=1,
                        help="independent runs integrated as one batch (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model precision (default float32)")
    parser.add_argument("--correct-jacobian", action="store_true",
                        help="use the true Jacobian instead of sqgturb's 2.25x one (docs/sqg.md)")
    parser.add_argument("--out", type=Path, help="output netCDF file (member files get _mNNN before the suffix)")
    parser.add_argument("--resume", action="store_true", help="continue OUT from its restart file")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--diagnose", type=Path, nargs="+", metavar="FILE",
                        help="instead of running: print theta std and KE-spectrum slope of FILE(s)")
    parser.add_argument("--from-day", type=number(float), default=50.0,
                        help="--diagnose: frames at t >= this day (default 50)")
    parser.add_argument("--plot", type=Path, help="--diagnose: write the KE spectra to this PNG")
    args = parser.parse_args(argv)
    if args.diagnose is None and args.out is None:
        parser.error("--out is required (or --diagnose FILE)")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """Check the schedule against the preset's time step and build the run's plan."""
    overrides = {} if args.dt is None else {"dt": args.dt}
    try:
        model = SQG.preset(args.preset, sqgturb_compat=not args.correct_jacobian, **overrides)
    except ValueError as err:
        raise InputError(str(err)) from None
    interval = args.output_interval_hours * 3600.0
    steps = interval / model.dt
    if not interval > 0 or abs(steps - round(steps)) > 1e-9 or round(steps) < 1:
        raise InputError(f"--output-interval-hours {args.output_interval_hours} must be a positive multiple of the "
                         f"preset's time step dt = {model.dt:g} s")
    spinup, length = args.spinup_days * DAY / interval, args.days * DAY / interval
    for name, value in (("--spinup-days", spinup), ("--days", length)):
        if value < 0 or abs(value - round(value)) > 1e-9:
            raise InputError(f"{name} must be a non-negative multiple of the output interval "
                             f"({args.output_interval_hours:g} h), got {value * interval / DAY:g} days")
    if round(length) < 1:
        raise InputError(f"--days must cover at least one output interval, got {args.days:g}")
    if args.members < 1:
        raise InputError(f"--members must be >= 1, got {args.members}")
    out = args.out
    paths = (out,) if args.members == 1 else tuple(out.with_name(f"{out.stem}_m{i:03d}{out.suffix}")
                                                   for i in range(args.members))
    return Plan(model=model, seed=args.seed, members=args.members, dtype=args.dtype, interval_steps=round(steps),
                spinup_events=round(spinup), frames=round(length) + 1, paths=paths,
                restart=out.with_name(out.name + ".restart.npz"))


def create_files(plan: Plan) -> None:
    """The members' empty run files (0 frames), each recording the run's identity and its member number."""
    for member, path in enumerate(plan.paths):
        create_run(path, n=plan.model.N, length=plan.model.L, height=plan.model.H, title=TITLE,
                   creator=COMMAND, attributes={**plan.identity(), "dealias": 1, "member": member})


def check_files(plan: Plan, frames: int) -> None:
    """Check that every member file belongs to this run and holds the ``frames`` its restart says were written."""
    for member, path in enumerate(plan.paths):
        on_disk = check_run(path, {**plan.identity(), "member": member}, plan.model.N)
        if on_disk < frames:
            raise InputError(f"{path} holds {on_disk} frames but its restart says {frames} were written")


def save_restart(plan: Plan, state: torch.Tensor, step: int, frames: int) -> None:
    """The exact batch state, its model step and the frames written, replaced atomically."""
    with atomic_file(plan.restart, "wb") as fh:
        np.savez(fh, state=state.cpu().numpy(), step=step, frames=frames, identity=json.dumps(plan.identity()))


def load_restart(plan: Plan) -> tuple[np.ndarray, int, int]:
    """(state, step, frames) of the restart file, checked against the plan."""
    if not plan.restart.exists():
        raise InputError(f"cannot resume: no restart file {plan.restart} (it is written beside OUT by this tool)")
    with np.load(plan.restart) as data:
        identity = json.loads(str(data["identity"]))
        state, step, frames = data["state"], int(data["step"]), int(data["frames"])
    requested = json.loads(json.dumps(plan.identity()))
    if identity != requested:
        differ = [f"{k}: restart {identity.get(k)!r}, requested {v!r}"
                  for k, v in requested.items() if identity.get(k) != v]
        raise InputError(f"{plan.restart} belongs to another run: " + "; ".join(differ))
    expected_shape = (plan.members, *plan.model.state_shape)
    if state.shape != expected_shape:
        raise InputError(f"{plan.restart}: state has shape {list(state.shape)}, expected {list(expected_shape)}")
    return state, step, frames


def prepare(plan: Plan, resume: bool, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Create the files and the initial state, or check and reopen them for ``--resume``."""
    dtype = DTYPES[plan.dtype]
    existing = [p for p in (*plan.paths, plan.restart) if p.exists()]
    if not resume:
        if existing:
            raise InputError(f"{', '.join(map(str, existing))} already exist; pass --resume to continue, "
                             "or remove them to start again")
        generator = torch.Generator().manual_seed(plan.seed)
        state = torch.stack([plan.model.initial_state(generator, dtype, device) for _ in range(plan.members)])
        create_files(plan)
        save_restart(plan, state, 0, 0)
        return state, 0, 0
    missing = [str(p) for p in plan.paths if not p.exists()]
    if missing:
        raise InputError(f"cannot resume: missing {', '.join(missing)}")
    state, step, frames = load_restart(plan)
    check_files(plan, frames)
    due = max(0, step // plan.interval_steps - plan.spinup_events + 1)  # frames up to this step
    if step % plan.interval_steps or frames not in (due - 1, due):
        raise InputError(f"{plan.restart}: model step {step} does not match the {frames} frames it says were written")
    return torch.from_numpy(state).to(device=device, dtype=dtype), step, frames


def run(plan: Plan, device: torch.device, resume: bool, progress: bool) -> int:
    """Integrate and write every frame; returns the number of frames in each file."""
    state, step, frames = prepare(plan, resume, device)
    last_event = plan.spinup_events + plan.frames - 1
    if frames >= plan.frames:
        print(f"{plan.paths[0]}: already holds {frames} frames (requested {plan.frames}); nothing to do")
        return frames
    writers = [RunWriter(path) for path in plan.paths]
    bar = tqdm(total=last_event * plan.interval_steps, initial=step, unit="step", desc="sqg", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    saved_at = time.monotonic()
    try:  # the restart is saved only from a finite state whose frames are all on disk
        while True:
            frame = step // plan.interval_steps - plan.spinup_events
            if frame >= frames:  # this frame is due and not yet on disk
                values = state.float().cpu().numpy()
                for member, writer in enumerate(writers):
                    writer.write(frame, values[member], step * plan.model.dt)
                frames = frame + 1
            if frames == plan.frames:
                break
            if time.monotonic() - saved_at > RESTART_EVERY_SECONDS:
                save_restart(plan, state, step, frames)
                saved_at = time.monotonic()
            advanced = plan.model.step(state, plan.interval_steps)
            if not torch.isfinite(advanced).all():
                day = step * plan.model.dt / DAY
                raise FloatingPointError(f"the SQG state became non-finite near model day {day:g}; "
                                         "a smaller --dt keeps RK4 stable (docs/sqg.md)")
            state, step = advanced, step + plan.interval_steps  # one statement: a signal cannot split it
            bar.update(plan.interval_steps)
        save_restart(plan, state, step, frames)
    except KeyboardInterrupt:
        save_restart(plan, state, step, frames)
        raise
    finally:
        for writer in writers:
            writer.close()
        bar.close()
        signal.signal(signal.SIGTERM, previous)
    return frames


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def kinetic_energy_spectrum(theta: torch.Tensor, model: SQG) -> tuple[np.ndarray, np.ndarray]:
    """Shell-summed KE(K) = 1/2 sum_{|K| in shell} |K|^2 |psi_hat|^2 (m^2/s^2) per level.

    ``theta``: ``[..., 2, N, N]`` (K). Returns (integer shells 0..N/2, spectra ``[..., 2, N/2+1]``).
    """
    ops = model.operators(torch.float64, "cpu")
    psi_hat = invert(torch.fft.rfft2(theta.double().cpu(), norm="forward"), ops)
    weight = torch.full(ops.ksq.shape, 2.0, dtype=torch.float64)  # rfft2 stores one of each +-k pair
    weight[:, 0] = 1.0
    weight[:, -1] = 1.0
    density = (0.5 * weight * ops.ksq * psi_hat.abs() ** 2).flatten(-2)
    shell = torch.round(ops.ksq.sqrt() * model.L / (2 * math.pi)).long().flatten()
    inside = shell <= model.N // 2  # the corners |K| > N/2 form no complete shell
    spectra = torch.zeros((*density.shape[:-1], model.N // 2 + 1), dtype=torch.float64)
    spectra.index_add_(-1, shell[inside], density[..., inside])
    return np.arange(model.N // 2 + 1), spectra.numpy()


def spectral_slope(shells: np.ndarray, spectrum: np.ndarray, kmin: int, kmax: int) -> float:
    """Least-squares slope of log KE against log K over shells kmin..kmax."""
    keep = (shells >= kmin) & (shells <= kmax)
    return float(np.polyfit(np.log(shells[keep]), np.log(spectrum[keep]), 1)[0])


def model_from_attributes(attributes: Mapping[str, Any], path: Path) -> SQG:
    """The SQG parameters recorded in the global attributes of a file written by this tool."""
    names = [field.name for field in dataclasses.fields(SQG)]
    missing = [name for name in names if name not in attributes]
    if missing:
        raise InputError(f"{path}: no model attributes {missing} (not written by {COMMAND}?)")
    flags, integers = ("symmetric", "sqgturb_compat"), ("N", "diff_order")
    return SQG(**{name: bool(attributes[name]) if name in flags else int(attributes[name]) if name in integers
                  else float(attributes[name]) for name in names})


def diagnose(path: Path, from_day: float) -> dict[str, Any]:
    """Time-mean spatial std of theta per level and the KE spectrum (and slope) of frames after ``from_day``."""
    run = open_run(str(path))
    model = model_from_attributes(run.attributes, path)
    times = run.times
    use = np.flatnonzero(times >= from_day * DAY)
    if use.size == 0:
        raise InputError(f"{path}: no frames at or after day {from_day:g} (last frame at day {times[-1] / DAY:g})")
    stds, spectra = [], []
    with FrameReader(Timeline.from_runs([run])) as reader:
        for start in range(use[0], use[-1] + 1, 256):
            theta = torch.from_numpy(reader.read(start, min(start + 256, use[-1] + 1)).astype(np.float64))
            stds.append(theta.std(dim=(-2, -1)).numpy())
            shells, spectrum = kinetic_energy_spectrum(theta, model)
            spectra.append(spectrum)
    spectrum = np.concatenate(spectra).mean(0)  # [2, N/2+1]
    total = spectrum.sum(0)
    kmin, kmax = SLOPE_RANGE
    return {
        "path": str(path), "N": model.N, "sqgturb_compat": model.sqgturb_compat, "frames": int(use.size),
        "days": (float(times[use[0]] / DAY), float(times[use[-1]] / DAY)),
        "std_K": np.concatenate(stds).mean(0).tolist(), "shells": shells, "spectrum": spectrum,
        "slope": spectral_slope(shells, total, kmin, kmax),
        "slope_levels": [spectral_slope(shells, level, kmin, kmax) for level in spectrum],
    }


def plot_spectra(results: list[dict[str, Any]], path: Path) -> None:
    """Log-log KE spectra (both levels summed) with the fitted slopes and k^-5/3, k^-2 guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kmin, kmax = SLOPE_RANGE
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for result in results:
        shells, total = result["shells"][1:], result["spectrum"].sum(0)[1:]
        label = "sqgturb Jacobian (2.25x)" if result["sqgturb_compat"] else "true Jacobian"
        (line,) = ax.loglog(shells, total, label=f"{label}: slope {result['slope']:.2f}")
        fit = np.exp(np.polyval(np.polyfit(np.log(shells[kmin - 1:kmax]), np.log(total[kmin - 1:kmax]), 1),
                                np.log(shells[kmin - 1:kmax])))
        ax.loglog(shells[kmin - 1:kmax], fit, "--", color=line.get_color(), lw=1)
    reference = results[0]["spectrum"].sum(0)[kmin]
    guide = np.array([kmin / 1.5, kmax * 1.3])
    for power, style in ((-5 / 3, ":"), (-2.0, "-.")):
        ax.loglog(guide, 0.5 * reference * (guide / kmin) ** power, "k" + style, lw=1, label=f"k^{power:.2f}")
    ax.axvspan(kmin, kmax, color="0.9", zorder=0)
    ax.set_xlabel("total wavenumber (cycles per domain)")
    ax.set_ylabel("kinetic energy, both lids (m$^2$ s$^{-2}$ per shell)")
    first = results[0]
    ax.set_title(f"SQG {first['N']}$^2$, days {first['days'][0]:.0f}-{first['days'][1]:.0f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """The sqg_generate command: exit status 0, 2 for a bad request, 1 if the model blew up, 130 if interrupted."""
    args = parse_args(argv)
    try:
        if args.diagnose is not None:
            results = [diagnose(path, args.from_day) for path in args.diagnose]
            for r in results:
                print(f"{r['path']}: {r['frames']} frames, days {r['days'][0]:g}-{r['days'][1]:g}, "
                      f"sqgturb_compat={r['sqgturb_compat']}: time-mean spatial std of theta "
                      f"{r['std_K'][0]:.2f} K (z=0), {r['std_K'][1]:.2f} K (z=H); KE slope over shells "
                      f"{SLOPE_RANGE[0]}-{SLOPE_RANGE[1]}: {r['slope']:.2f} "
                      f"(levels {r['slope_levels'][0]:.2f}, {r['slope_levels'][1]:.2f})")
            if args.plot is not None:
                plot_spectra(results, args.plot)
                print(f"wrote {args.plot}")
            return 0
        check_device(args.device)
        device = torch.device(args.device)
        plan = make_plan(args)
        start = time.perf_counter()
        frames = run(plan, device, args.resume, not args.no_progress)
        print(f"{', '.join(map(str, plan.paths))}: {frames} frames of {plan.interval / 3600:g} h "
              f"({time.perf_counter() - start:.1f} s)")
        return 0
    except (InputError, OSError) as err:
        print(f"sqg_generate: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"sqg_generate: error: {err}; the files hold every frame before it", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sqg_generate: interrupted; the files hold every completed frame, continue with --resume",
              file=sys.stderr)
        return 130
