"""The fused Triton EnSF analysis against the straightforward torch version and its roofline (GPU).

Run:  python bench/ensf_fused_bench.py                    (CUDA; add --help for options)

For each d: one analysis (N members, K steps, one-to-one prior score, arctan observations of
every variable) timed with the fused kernel and with the torch path (one kernel per operation
per step, torch.randn noise), side by side. The roofline has two floors:

* memory: the fewest bytes an analysis moves, 4 x (2 N d + 2 d) (forecast and observations in,
  analysis out), over the device-to-device copy bandwidth measured here;
* random numbers: a kernel that draws the same N d (K + 1) counter-based normals (in
  Box-Muller pairs) and keeps only their sum: what generating this noise in place costs.

The fused kernel's gap is its time over the larger floor. Also prints the peak GPU memory of
each version and, with --sweep, the fused time over block sizes and warps.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl
from ensf_scaling import copy_bandwidth  # bench/ is on the path of a bench script

from da_plugin.counter_rng import CounterDraws, pair_key
from da_plugin.filters import ensf_fused
from da_plugin.filters.ensf import EnSF
from da_plugin.filters.ensf_fused import _polar
from da_plugin.obs import ObservationOperator

SIGMA_OBS = 0.05


@triton.jit
def _rng_only_kernel(out_ptr, keys_ptr, width, PAIRS: tl.constexpr, BLOCK: tl.constexpr):
    """Draw the PAIRS Box-Muller pairs per element exactly as the fused kernel does; store only their sum."""
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    counter = (row * width + cols).to(tl.uint64, bitcast=True)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for pair in range(PAIRS):
        even, odd = _polar(counter, keys_ptr + pair, True)
        total += even + odd
    tl.store(out_ptr + row * width + cols, total, mask=cols < width)


def cuda_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after one warm-up, with CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def rng_floor_ms(forecast: torch.Tensor, steps: int, repeats: int) -> float:
    """Milliseconds of the RNG floor: the K + 1 normals of a K-step analysis, in Box-Muller pairs,
    per entry of ``forecast``, summed."""
    members, d = forecast.shape
    pairs = steps // 2 + 1
    out = torch.empty_like(forecast)
    keys = torch.tensor([pair_key(1, p) for p in range(pairs)], dtype=torch.int64, device="cuda")
    grid = (triton.cdiv(d, ensf_fused.BLOCK), members)
    return cuda_ms(lambda: _rng_only_kernel[grid](out, keys, d, PAIRS=pairs, BLOCK=ensf_fused.BLOCK,
                                                  num_warps=ensf_fused.NUM_WARPS, enable_fp_fusion=True), repeats)


def problem(d: int, members: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, ObservationOperator]:
    """Truth ~ N(0, 3^2), forecast = truth + N(0, 1), y = atan(truth) + N(0, 0.05^2), on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    truth = 3.0 * torch.randn(d, generator=gen, device="cuda")
    forecast = truth + torch.randn(members, d, generator=gen, device="cuda")
    obs = ObservationOperator("arctan", SIGMA_OBS, torch.arange(d, device="cuda"), d)
    return forecast, obs.sample(truth, gen), obs


def measure(d: int, args: argparse.Namespace, bandwidth: float) -> dict:
    """One row: fused, torch, both floors and peak memories for state size d."""
    n, k = args.members, args.steps
    forecast, y, obs = problem(d, n)
    fused = EnSF(ensemble_size=n, steps=k, backend="triton", likelihood_step=args.likelihood_step)
    torch.cuda.reset_peak_memory_stats()
    fused_ms = cuda_ms(lambda: fused.analysis(forecast, y, obs, CounterDraws(seed=1)), args.repeats)
    fused_peak = torch.cuda.max_memory_allocated() / 2**30
    rng_ms = rng_floor_ms(forecast, k, args.repeats)
    min_bytes = 4 * (2 * n * d + 2 * d)
    memory_ms = min_bytes / (bandwidth * 1e9) * 1e3
    row = dict(d=d, fused_ms=fused_ms, rng_floor_ms=rng_ms, memory_floor_ms=memory_ms, fused_peak_gib=fused_peak,
               fused_gbs=min_bytes / (fused_ms / 1e3) / 1e9)
    if d <= args.max_torch_dim:
        plain = EnSF(ensemble_size=n, steps=k, backend="torch", likelihood_step=args.likelihood_step)
        gen = torch.Generator(device="cuda").manual_seed(2)
        torch.cuda.reset_peak_memory_stats()
        try:
            row["torch_ms"] = cuda_ms(lambda: plain.analysis(forecast, y, obs, gen), max(1, args.repeats // 2))
            row["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.cuda.OutOfMemoryError:
            row["torch_ms"] = float("nan")
            row["torch_peak_gib"] = float("nan")
        torch.cuda.empty_cache()
    return row


def sweep(d: int, args: argparse.Namespace) -> None:
    """Fused time over BLOCK and num_warps (module constants of ensf_fused) at state size d."""
    forecast, y, obs = problem(d, args.members)
    ensf = EnSF(ensemble_size=args.members, steps=args.steps, backend="triton", likelihood_step=args.likelihood_step)
    default = ensf_fused.BLOCK, ensf_fused.NUM_WARPS
    print(f"sweep at d={d:,}: BLOCK num_warps fused ms, RNG floor ms, ratio")
    for block in (256, 512, 1024, 2048):
        for warps in (2, 4, 8):
            ensf_fused.BLOCK, ensf_fused.NUM_WARPS = block, warps
            ms = cuda_ms(lambda: ensf.analysis(forecast, y, obs, CounterDraws(seed=1)), args.repeats)
            floor = rng_floor_ms(forecast, args.steps, args.repeats)
            print(f"  {block:>5} {warps:>3} {ms:>9.2f} {floor:>9.2f} {ms / floor:>6.2f}x", flush=True)
    ensf_fused.BLOCK, ensf_fused.NUM_WARPS = default  # the table below uses the defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--members", type=int, default=20, help="ensemble size N")
    parser.add_argument("--steps", type=int, default=100, help="reverse-SDE steps K")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median) after one warm-up")
    parser.add_argument("--max-torch-dim", type=int, default=100_000_000,
                        help="largest d for which the straightforward torch version is also timed")
    parser.add_argument("--sweep", type=int, metavar="D", help="also sweep block size and warps at this d")
    parser.add_argument("--likelihood-step", choices=["explicit", "semi_implicit"], default="explicit",
                        help="EnSF.likelihood_step of both versions")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device (bench/ensf_bench.py covers the CPU)")

    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth(torch.device("cuda"), gbytes=4.0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}; "
          f"measured copy bandwidth {bandwidth:.0f} GB/s; N={args.members}, K={args.steps}, arctan obs, float32, "
          f"{args.likelihood_step} likelihood step")
    if args.sweep:
        sweep(args.sweep, args)
    header = (f"{'d':>12} {'fused ms':>9} {'torch ms':>9} {'speedup':>8} {'mem floor':>9} {'rng floor':>9} "
              f"{'fused/floor':>11} {'fused GB/s':>10} {'fused peak':>10} {'torch peak':>10}")
    print(header)
    for d in args.dims:
        r = measure(d, args, bandwidth)
        floor = max(r["memory_floor_ms"], r["rng_floor_ms"])
        torch_ms = r.get("torch_ms", float("nan"))
        print(f"{d:>12,} {r['fused_ms']:>9.2f} {torch_ms:>9.1f} {torch_ms / r['fused_ms']:>7.1f}x "
              f"{r['memory_floor_ms']:>9.2f} {r['rng_floor_ms']:>9.2f} {r['fused_ms'] / floor:>10.2f}x "
              f"{r['fused_gbs']:>10.0f} {r['fused_peak_gib']:>8.2f}Gi {r.get('torch_peak_gib', float('nan')):>8.2f}Gi",
              flush=True)


if __name__ == "__main__":
    main()
