"""Static instruction counts of the fused EnSF kernel and of its RNG floor, on any machine.

Run:  python bench/ensf_fused_sass.py                      (no GPU needed; add --help for options)

Triton compiles the fused kernel (``da_plugin/filters/ensf_fused.py``) and the RNG-floor kernel
of ``bench/ensf_fused_bench.py`` for a CUDA architecture (default sm_90, the H100/H200) without a
GPU, and cuobjdump (shipped with Triton) disassembles them. Each kernel's main loop is counted
per state element and Box-Muller pair (two reverse-SDE steps in the fused kernel), by the
hardware unit that executes it, and so is the whole kernel per element. Both loops sit near the
issue limit with the SFU (MUFU: log, sqrt, sin, cos, reciprocals) next, so the ratio of the
counts predicts the time ratio that ``bench/ensf_fused_bench.py`` measures, up to how well each
kernel keeps the schedulers busy. For the kernel measured at 2.51x its floor on an H100, this
tool gives 2.37 over the whole kernel with Triton 3.6 (the device's version); see
docs/results.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

import triton
from ensf_fused_bench import _rng_only_kernel  # bench/ is on the path of a bench script
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from da_plugin.filters import ensf_fused

# SASS opcode (before the first dot) -> the unit that executes it on Hopper
UNITS = {"FFMA": "fp32", "FMUL": "fp32", "FADD": "fp32", "FMNMX": "fp32",
         "IMAD": "int-mad", "LOP3": "int/alu", "SHF": "int/alu", "IADD3": "int/alu", "ISETP": "int/alu",
         "FSEL": "int/alu", "FSETP": "int/alu", "SEL": "int/alu", "P2R": "int/alu", "I2FP": "int/alu",
         "MOV": "int/alu", "MUFU": "sfu", "I2F": "sfu", "LDG": "memory", "STG": "memory", "BRA": "control"}
# clocks a Hopper scheduler (SM sub-partition) spends per warp instruction on each unit, from the
# per-SM rates NVIDIA publishes for compute capability 9.0 (128 fp32, 64 integer, 16 SFU results
# per clock): an estimate, which ignores latencies and the sharing of the FMA pipes
CLOCKS_PER_WARP_INSTRUCTION = {"fp32": 1, "int/alu": 2, "int-mad": 2, "sfu": 8}
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\S*)")
BRANCH = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+@!?P\d+\s+BRA\s+(?:`\()?0x([0-9a-f]+)")


def cuobjdump() -> str:
    """Path of the cuobjdump that ships with Triton's NVIDIA backend, or one on PATH."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if found is None:
        sys.exit(f"cuobjdump not found (looked for {bundled} and on PATH)")
    return found


def sass(fn, signature: dict[str, str], constants: dict, arch: int, warps: int) -> tuple[str, int]:
    """Disassembly of ``fn`` compiled for sm_<arch> with the given argument types and constants,
    and the registers per thread it needs."""
    signature = dict(signature, **{name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "enable_fp_fusion": True})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        disassembly, usage = (subprocess.run([cuobjdump(), flag, cubin.name], check=True, capture_output=True,
                                             text=True).stdout for flag in ("-sass", "-res-usage"))
    return disassembly, int(re.search(r"REG:(\d+)", usage).group(1))


def main_loop(disassembly: str) -> tuple[list[str], list[str]]:
    """Opcodes (with modifiers) in the widest backward branch's body, the kernel's main loop,
    and those outside it, which run once per program."""
    lines = disassembly.splitlines()
    loops = [(int(m.group(2), 16), int(m.group(1), 16)) for m in map(BRANCH.match, lines)
             if m and int(m.group(2), 16) < int(m.group(1), 16)]
    if not loops:
        raise RuntimeError("no loop found in the disassembly")
    start, stop = max(loops, key=lambda loop: loop[1] - loop[0])
    inside, outside = [], []
    for m in map(INSTRUCTION.match, lines):
        if m and m.group(2) not in ("NOP", "EXIT"):
            (inside if start <= int(m.group(1), 16) <= stop else outside).append(m.group(2) + m.group(3))
    return inside, outside


def per_element(loop: list[str], rest: list[str], elements_per_thread: int, pairs: int) -> float:
    """Instructions one thread issues per state element over the whole kernel: the loop body times
    its trip count (the pairs it draws, one MUFU.LG2 per element each) plus the rest once."""
    per_pass = sum(op == "MUFU.LG2" for op in loop)
    trips = (pairs * elements_per_thread - sum(op == "MUFU.LG2" for op in rest)) / per_pass
    return (trips * len(loop) + len(rest)) / elements_per_thread


def per_pair(opcodes: list[str], elements_per_thread: int) -> collections.Counter:
    """Instructions per unit per state element and Box-Muller pair (one MUFU.LG2 per pair)."""
    pairs = sum(op == "MUFU.LG2" for op in opcodes) / elements_per_thread
    units = collections.Counter()
    for op in opcodes:
        units[UNITS.get(op.split(".")[0], "other")] += 1 / elements_per_thread / pairs
    return units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--block", type=int, default=ensf_fused.BLOCK, help="state elements per program")
    parser.add_argument("--warps", type=int, default=ensf_fused.NUM_WARPS, help="warps per program")
    parser.add_argument("--steps", type=int, default=100, help="reverse-SDE steps K")
    parser.add_argument("--operator", choices=["arctan", "identity"], default="arctan")
    parser.add_argument("--partial", action="store_true",
                        help="an operator that observes only some variables (a precision per variable)")
    parser.add_argument("--semi-implicit", action="store_true", help="the semi-implicit likelihood step")
    parser.add_argument("--show", action="store_true", help="also print the fused kernel's main loop")
    args = parser.parse_args()

    pairs = args.steps // 2 + 1  # Box-Muller pairs per element: K + 1 draws, paired
    pointers = ["z_ptr", "center_ptr", "y_ptr", "precision_ptr"]
    fused_signature = {**{name: "*fp32" for name in pointers}, "keys_ptr": "*i64", "coef_ptr": "*i64",
                       "largest_ptr": "*fp32", "width": "i32", "dim": "i64", "col_offset": "i64",
                       "row_offset": "i64", "step": "i32"}
    fused_constants = dict(ARCTAN=args.operator == "arctan", ALL_OBSERVED=not args.partial,
                           SEMI_IMPLICIT=args.semi_implicit, WHOLE_RUN=True, STEPS=args.steps, FAST=True,
                           BLOCK=args.block)
    fused, fused_registers = sass(ensf_fused._reverse_sde_kernel, fused_signature, fused_constants, args.arch,
                                  args.warps)
    floor, floor_registers = sass(_rng_only_kernel, {"out_ptr": "*fp32", "keys_ptr": "*i64", "width": "i32"},
                                  dict(PAIRS=pairs, BLOCK=args.block), args.arch, args.warps)
    elements = args.block // (32 * args.warps)
    (fused_loop, fused_rest), (floor_loop, floor_rest) = main_loop(fused), main_loop(floor)
    fused_units, floor_units = per_pair(fused_loop, elements), per_pair(floor_loop, elements)

    print(f"sm_{args.arch}, Triton {triton.__version__}, BLOCK={args.block}, {args.warps} warps "
          f"({elements} elements per thread), K={args.steps}, {args.operator} observations of "
          + ("some variables" if args.partial else "every variable")
          + (", semi-implicit likelihood step" if args.semi_implicit else ""))
    print("instructions per state element and Box-Muller pair (the fused kernel: two reverse-SDE steps)")
    print(f"{'unit':>10} {'fused':>8} {'floor':>8}")
    for unit in sorted(set(fused_units) | set(floor_units), key=lambda u: -fused_units[u]):
        print(f"{unit:>10} {fused_units[unit]:>8.1f} {floor_units[unit]:>8.1f}")
    fused_total, floor_total = sum(fused_units.values()), sum(floor_units.values())
    print(f"{'total':>10} {fused_total:>8.1f} {floor_total:>8.1f}")
    print(f"fused / floor: {fused_total / floor_total:.3f} in instructions issued, "
          f"{fused_units['sfu'] / floor_units['sfu']:.3f} in SFU operations")
    print("estimated busy clocks of one scheduler per warp and pair (issue: 1 per instruction; "
          + ", ".join(f"{unit}: {clocks}" for unit, clocks in CLOCKS_PER_WARP_INSTRUCTION.items()) + ")")
    for name, units in (("fused", fused_units), ("floor", floor_units)):
        busy = {unit: units[unit] * clocks for unit, clocks in CLOCKS_PER_WARP_INSTRUCTION.items()}
        print(f"{name:>10} issue {sum(units.values()):.0f}, " + ", ".join(f"{u} {c:.0f}" for u, c in busy.items()))
    fused_all = per_element(fused_loop, fused_rest, elements, pairs)
    floor_all = per_element(floor_loop, floor_rest, elements, pairs)
    print(f"whole kernels, per state element: fused {fused_all:.0f}, floor {floor_all:.0f}, "
          f"ratio {fused_all / floor_all:.3f}")
    print(f"main loop code: fused {len(fused_loop) * 16 / 1024:.1f} KiB, floor {len(floor_loop) * 16 / 1024:.1f} KiB; "
          f"registers per thread: fused {fused_registers}, floor {floor_registers}")
    if args.show:
        print("\nfused main loop:\n" + "\n".join(fused_loop))


if __name__ == "__main__":
    main()
