"""Training configuration: the YAML sections besides ``model`` (configs/vit/*.yaml).

Precedence, last wins: dataclass defaults < YAML file < dotted overrides (``train.steps=200``).
The DeepSpeed JSON (``deepspeed.config``, or ``--deepspeed_config``) owns what the engine owns:
micro-batch, gradient accumulation, ZeRO stage, bf16 and gradient clipping; this file owns the
model, the parallel layout, data, optimizer schedule, run length, logging and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megavit.model.config import ViTConfig


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel ranks (innermost in the rank layout)."""
    pp: int = 1
    """Pipeline stages (outermost); dp is the world size / (tp * pp)."""
    sequence_parallel: bool = False
    """Shard the tokens over the TP group outside attention and MLP (needs tp > 1)."""
    engine: Literal["auto", "pipeline", "plain"] = "auto"
    """pipeline: DeepSpeed PipelineModule (any pp, ZeRO <= 1); plain: the whole chain on one stage
    (pp = 1, any ZeRO stage); auto: pipeline when pp > 1."""
    partition_method: Literal["parameters", "uniform"] = "parameters"
    """How DeepSpeed assigns layers to pipeline stages."""


@dataclass
class DataConfig:
    root: str | None = None
    """Shard directory written by tools/nc2npy_mpi.py (train/, val/, normalize_*.npz)."""
    synthetic: bool = False
    """Random frames of the model's shape instead of shards (benchmarks, smoke tests)."""
    lead: int = 1
    """Frames between input and target (1 = the shard's output interval)."""
    synthetic_samples: int = 4096
    """Samples in the synthetic training set (its validation set has 1/8 as many)."""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr, reached at train.steps (cosine decay)."""


@dataclass
class RunConfig:
    steps: int = 1000
    """Optimizer steps."""
    seed: int = 1234
    output_dir: str = "runs/vit"
    """TensorBoard events in output_dir/tensorboard, checkpoints in output_dir/checkpoints."""
    log_every: int = 10
    eval_every: int = 100
    """Steps between validation passes (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per validation pass."""
    save_every: int = 500
    """Steps between checkpoints (0: only at the end)."""
    peak_tflops: float | None = None
    """Per-device peak for MFU; default 989 (H100 bf16 dense) on CUDA, none on CPU."""
    progress: bool = True
    compile_blocks: bool = False
    """torch.compile each transformer block (fuses its elementwise work; the first steps compile)."""


@dataclass
class DeepSpeedSection:
    config: str = "configs/deepspeed/zero1_bf16.json"
    """DeepSpeed JSON; ``--deepspeed_config`` on the command line takes precedence."""


@dataclass
class TrainConfig:
    model: ViTConfig = field(default_factory=ViTConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def __post_init__(self) -> None:
        if self.data.root is None and not self.data.synthetic:
            raise ValueError("data.root is not set: give the shard directory (tools/nc2npy_mpi.py) "
                             "or data.synthetic=true")
        if self.train.steps < 1 or self.train.log_every < 1:
            raise ValueError(f"train.steps and train.log_every must be >= 1, got {self.train.steps} "
                             f"and {self.train.log_every}")
        if self.parallel.engine == "plain" and self.parallel.pp > 1:
            raise ValueError(f"parallel.engine=plain holds the whole model on one stage; it needs pp=1, "
                             f"got pp={self.parallel.pp}")

    @property
    def uses_pipeline(self) -> bool:
        return self.parallel.engine == "pipeline" or (self.parallel.engine == "auto" and self.parallel.pp > 1)
