"""The decomposed twin experiment's settings (``python -m da_plugin.scale CONFIG [key=value ...]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from da_plugin.filters.ensf import EnSF
from da_plugin.models.lorenz96 import Lorenz96
from da_plugin.obs import ObsConfig
from megavit.config import bounded, check_bounds


@dataclass
class ScaleConfig:
    """A decomposed twin experiment: Lorenz-96 truth, arctan/identity observations, EnSF."""

    seed: int = 0
    cycles: int = bounded(10, ge=1)
    spinup_steps: int = bounded(1000, ge=0)  # truth steps from 8 + N(0, 1) onto the attractor
    init_spread: float = bounded(1.0, ge=0)  # initial ensemble = truth + N(0, init_spread^2)
    problem_dir: str | None = None  # read truth/obs shards (tools/ensf_problem_gen.py) instead of computing them
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the rank's local GPU when there is one
    dtype: Literal["float32", "float64"] = "float32"
    timeout_s: float = bounded(300.0, gt=0)  # a rank silent this long (dead, hung) stops the job with an error
    forecast_chunk: int = bounded(4, ge=1)  # members integrated together (bounds the RK4 temporaries at d = 1e8)
    output_dir: str = "runs/ensf_scale"
    overwrite: bool = False  # replace the outputs of an earlier run in output_dir (else refused before any work)
    progress: bool = True
    model: Lorenz96 = field(default_factory=lambda: Lorenz96(dim=1_000_000, dt=0.005))
    # every obs.stride-th variable every obs.every model steps (a random subset would need the whole state)
    obs: ObsConfig = field(default_factory=lambda: ObsConfig(operator="arctan", sigma=0.05))
    filter: EnSF = field(default_factory=EnSF)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.obs.random_fraction is not None:
            raise ValueError("obs.random_fraction is not available to the decomposed run (no rank holds the whole "
                             "state to draw the subset from); use obs.stride")
