"""Benchmark the batched torch SQG model against a NumPy member loop: member-steps per second.

Run:  .venv/bin/python bench/sqg_bench.py            (add --help for options)

Each resolution uses its sqgturb preset (dt, diffusion) and the true Jacobian; the state is a
spun-up-like field (jet plus noise; the cost of a step does not depend on the flow). A
measurement is ``SQG.step(x, steps)`` on a batch of members, after one warm-up call (which also
builds the cached spectral operators and buffers), CUDA-synchronized on GPU; the median of
``--repeats`` runs, taking turns with the other contenders of the row, is reported as ms per
step, member-steps per second and simulated days per wall-clock second for the whole batch.

On the CPU each row also times ``NumpySQG``, the same algorithm written plainly in NumPy the way
sqgturb's model is (one member at a time, ``numpy.fft`` rfft2/irfft2 on the whole padded grid,
which keep float32 in NumPy >= 2, so both sides run in ``--dtype``), looping over the members,
and prints torch's member-steps per second over NumPy's. The torch rows are timed at 1 thread
and at torch's default thread count (``--threads``: that count only); the model shares groups of
members out over that many worker threads. NumPy's FFTs are single-threaded.
The default run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from timing import add_device_options, selected_devices, timed  # bench/timing.py (scripts run from bench/)

from da_plugin.models.sqg import SQG

WORK = 320  # member-steps per timed call at 64^2 (scaled by the grid's area at other sizes)


class NumpySQG:
    """The model's step in plain NumPy for one member ``[2, N, N]``: RK4 on rfft2 spectra, the
    Jacobian from derivatives zero-padded to 3N/2 (true Jacobian, Nyquist modes dropped; no Ekman
    term, as in the presets: r = 0)."""

    def __init__(self, model: SQG, dtype: np.dtype):
        if model.r or model.sqgturb_compat:
            raise ValueError("NumpySQG has no Ekman term and the true Jacobian only")
        ops = model.operators(torch.float64, "cpu")
        cdtype = np.complex64 if dtype == np.float32 else np.complex128
        self.n, self.m, self.dt = model.N, ops.m, model.dt
        self.ikx, self.iky = (t.numpy().astype(cdtype) for t in (ops.ikx_pad, ops.iky_pad))
        self.psi_self, self.psi_cross, self.hyperdiff = (
            t.numpy().astype(dtype) for t in (ops.psi_self, ops.psi_cross, ops.hyperdiff))
        self.theta_eq_hat, self.relax_rate = ops.theta_eq_hat.numpy().astype(cdtype), ops.relax_rate
        self.padded = np.zeros((2, 2, self.m, self.m // 2 + 1), cdtype)  # [psi | theta, level]

    def tendency(self, theta_hat: np.ndarray) -> np.ndarray:
        n, m, h = self.n, self.m, self.n // 2
        psi_hat = np.stack((self.psi_cross * theta_hat[1] - self.psi_self * theta_hat[0],
                            self.psi_self * theta_hat[1] - self.psi_cross * theta_hat[0]))
        for i, spec in enumerate((psi_hat, theta_hat)):
            self.padded[i, :, :h, :h] = spec[:, :h, :h]
            self.padded[i, :, m - h + 1:, :h] = spec[:, n - h + 1:, :h]
        grads = np.fft.irfft2(np.stack((self.ikx * self.padded, self.iky * self.padded)), s=(m, m), norm="forward")
        product = np.fft.rfft2(grads[0, 0] * grads[1, 1] - grads[1, 0] * grads[0, 1], norm="forward")
        out = self.relax_rate * (self.theta_eq_hat - theta_hat)
        out[:, :h, :h] -= product[:, :h, :h]
        out[:, n - h + 1:, :h] -= product[:, m - h + 1:, :h]
        return out

    def step(self, x: np.ndarray, steps: int) -> np.ndarray:
        theta_hat = np.fft.rfft2(x, norm="forward")
        for _ in range(steps):
            k1 = self.tendency(theta_hat)
            k2 = self.tendency(theta_hat + 0.5 * self.dt * k1)
            k3 = self.tendency(theta_hat + 0.5 * self.dt * k2)
            k4 = self.tendency(theta_hat + self.dt * k3)
            theta_hat = self.hyperdiff * (theta_hat + (self.dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4))
        return np.fft.irfft2(theta_hat, s=(self.n, self.n), norm="forward")


def start(model: SQG, members: int) -> torch.Tensor:
    """Jet plus strong seeded noise, float64 ``[members, 2, N, N]``: a nonlinear, turbulent-like start."""
    generator = torch.Generator().manual_seed(0)
    return torch.stack([model.jet() + 10 * model.initial_state(generator, torch.float64) for _ in range(members)])


def check(device: torch.device, dtype: torch.dtype) -> None:
    """Agreement of the timed configuration (and of NumpySQG) with a float64 CPU run after 1 day at 64^2."""
    model = SQG.preset(64)
    x = start(model, 1)[0]
    reference = model.step(x, 72)
    diff = (model.step(x.to(device=device, dtype=dtype), 72).double().cpu() - reference).abs().max().item()
    numpy_diff = np.abs(NumpySQG(model, np.float64).step(x.numpy(), 72) - reference.numpy()).max()
    print(f"check 64^2, 1 day ({device.type}, {dtype}): max |theta - float64 CPU| = {diff:.2e} K "
          f"(theta spans {reference.min():.1f} .. {reference.max():.1f} K); NumpySQG float64: {numpy_diff:.2e} K")


def bench_rows(n: int, members: int, device: torch.device, dtype: torch.dtype, repeats: int,
               threads: list[int]) -> list[str]:
    """Table rows for one size and batch: ms per RK4 step of the batch, member-steps/s and days/s, on the
    CPU once per torch thread count, each with NumPy's member-steps/s and the ratio. The contenders
    take turns within each repeat, so a machine whose load drifts slows them alike."""
    model = SQG.preset(n)
    x64 = start(model, members)
    x = x64.to(device=device, dtype=dtype)
    steps = max(1, round(WORK * (64 / n) ** 2 / members))  # per call: about the same work at every size
    contenders = {}
    for count in threads if device.type == "cpu" else [torch.get_num_threads()]:
        def run_torch(count: int = count) -> None:
            torch.set_num_threads(count)
            model.step(x, steps)
        contenders[count] = run_torch
    if device.type == "cpu":
        reference = NumpySQG(model, np.dtype(str(dtype).removeprefix("torch.")))
        states = x64.numpy().astype(reference.hyperdiff.dtype)
        contenders["numpy"] = lambda: [reference.step(s, steps) for s in states]
    for fn in contenders.values():
        fn()  # warm-up: operators, buffers, FFT plans
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name] += timed(fn, device, 1, warmup=False)
    rates = {name: members * steps * 1e3 / statistics.median(ms) for name, ms in times.items()}
    rows = []
    for count in (name for name in contenders if name != "numpy"):
        ms = 1e3 * members / rates[count]
        row = (f"{device.type:>6} {n:>5}^2 {members:>7} {count:>7} {ms:>10.2f} {rates[count]:>14.0f} "
               f"{1e3 / ms * model.dt / 86400:>8.3g}")
        if "numpy" in rates:
            row += f" {rates['numpy']:>12.0f} {rates[count] / rates['numpy']:>7.2f}x"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="grid sizes N (presets)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 20], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    add_device_options(parser, dtype="float32")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    devices = selected_devices(args)  # applies --threads
    threads = sorted({1, torch.get_num_threads()}) if args.threads is None else [args.threads]
    print(f"SQG step (RK4, 3/2-rule dealiasing), dtype={args.dtype}, torch {torch.__version__}, numpy "
          f"{np.__version__}; torch CPU threads timed: {', '.join(map(str, threads))} (the model's worker "
          "threads over groups of members); NumPy's FFTs: 1 thread")
    for device in devices:
        check(device, dtype)
        print(f"{'device':>6} {'N':>7} {'members':>7} {'threads':>7} {'ms/step':>10} {'member-steps/s':>14} "
              f"{'days/s':>8} {'numpy m-s/s':>12} {'ratio':>8}   (days/s: simulated days per wall-clock "
              "second, whole batch; numpy: NumpySQG looping over the members; ratio: torch / numpy)")
        for n in args.sizes:
            for members in args.members:
                print("\n".join(bench_rows(n, members, device, dtype, args.repeats, threads)), flush=True)


if __name__ == "__main__":
    main()
