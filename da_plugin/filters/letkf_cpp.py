"""The LETKF's local weights as one C++ call (``filter.backend=cpp``), built on first use.

``letkf_kernel.cpp`` computes, point by point, what :func:`da_plugin.filters.letkf.ensemble_weights`
computes with ``solver=newton`` in batched tensor operations, from the gathered rows and neighbour
lists: on the CPU, a cycle of a small state spends most of its analysis in the overhead of those
operations (a few microseconds each, about 60 per analysis), and the per-point loop has none. Every
point gets its own Newton-Schulz scale and step count.

``torch.utils.cpp_extension`` compiles the file with the C++ compiler on the PATH into torch's
extension cache (``~/.cache/torch_extensions``, or ``TORCH_EXTENSIONS_DIR``): about a minute the
first time on a machine, well under a second afterwards. The build is named after the machine's
CPU model, since it is optimized for it (``-march=native``) and a cache may be shared by machines.
A failed build raises a ValueError with the compiler's first error line.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("letkf_kernel.cpp")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1) if match else platform.processor() or platform.machine()


@functools.cache
def kernel() -> ModuleType:
    """The compiled extension (built or loaded from the cache once per process)."""
    from torch.utils.cpp_extension import load

    tag = hashlib.sha256(cpu_model().encode()).hexdigest()[:8]
    try:
        return load(name=f"da_plugin_letkf_{tag}", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native"],
                    verbose=False)
    except Exception as error:  # the build raises RuntimeError, OSError or subprocess errors
        lines = str(error).splitlines() or [type(error).__name__]
        # the compiler's own "file:line: error: ..." line says more than torch's "Error building extension"
        first = next((line for line in lines if "error:" in line), lines[0])
        raise ValueError(f"filter.backend=cpp: building {SOURCE.name} failed ({first.strip()}); "
                         "use filter.backend=torch") from None


def local_weights(rows: torch.Tensor, neighbours: torch.Tensor, rinv: torch.Tensor) -> torch.Tensor:
    """Weights W + w 1^T ``[P, N, N]`` of every point from the obs-space rows ``[m, N + 1]`` (perturbations
    and innovation, :func:`da_plugin.filters.letkf.obs_space` transposed), its local observations
    ``neighbours`` ``[P, L]`` and their tapered inverse variances ``rinv`` ``[P, L]`` (zero: padding)."""
    return kernel().local_weights(rows, neighbours, rinv)
