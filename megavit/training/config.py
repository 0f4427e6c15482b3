"""Training configuration: the YAML sections besides ``model`` (configs/vit/*.yaml).

Precedence, last wins: dataclass defaults < YAML file < dotted overrides (``train.steps=200``).
The DeepSpeed JSON (``deepspeed.config``, or ``--deepspeed_config``) owns what the engine owns:
micro-batch, gradient accumulation, ZeRO stage, bf16 and gradient clipping; this file owns the
model, the parallel layout, data, optimizer schedule, run length, logging and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megavit.config import Bound, bounded
from megavit.model.config import ViTConfig

ZERO_STAGES = (0, 1, 2)
"""ZeRO stages the trainer supports: ZeRO-3 would split the parameters that the TP layers and
the checkpoint tools expect whole on each rank."""
PIPELINE_ZERO_STAGES = (0, 1)
"""DeepSpeed's pipeline engine reduces gradients itself and supports no gradient partitioning."""


@dataclass
class ParallelConfig:
    tp: int = bounded(1, ge=1)
    """Tensor-parallel ranks (innermost in the rank layout)."""
    pp: int = bounded(1, ge=1)
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
    lead: int = bounded(1, ge=1)
    """Frames between input and target (1 = the shard's output interval)."""
    synthetic_samples: int = bounded(4096, ge=1)
    """Samples in the synthetic training set (its validation set has 1/8 as many)."""
    verify_checksums: bool = True
    """Read every shard once at start and compare it with the SHA-256 in meta.json (about 1.7 GB/s
    per process); false skips this for very large datasets."""


@dataclass
class OptimConfig:
    lr: float = bounded(5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = bounded(1e-5, ge=0)
    warmup_steps: int = bounded(100, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    """Final LR as a fraction of lr, reached at train.steps (cosine decay)."""


@dataclass
class RunConfig:
    steps: int = bounded(1000, ge=1)
    """Optimizer steps."""
    seed: int = 1234
    output_dir: str = "runs/vit"
    """TensorBoard events in output_dir/tensorboard, checkpoints in output_dir/checkpoints."""
    log_every: int = bounded(10, ge=1)
    eval_every: int = bounded(100, ge=0)
    """Steps between validation passes (0: only at the end)."""
    eval_batches: int | None = bounded(None, ge=1)
    """Cap on each validation pass: score only the first eval_batches x micro-batch x dp samples of
    the val split (then the number depends on that product). None: the whole split, each sample
    once, the same number for every (tp, pp, dp, micro-batch) layout."""
    save_every: int = bounded(500, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    peak_tflops: float | None = bounded(None, gt=0)
    """Per-device peak for MFU; default 989 (H100 bf16 dense) on CUDA, none on CPU."""
    progress: bool = True
    compile_blocks: bool = False
    """torch.compile each transformer block (fuses its elementwise work; the first steps compile)."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds a run: remove its checkpoints, metrics, TensorBoard
    events and config first. Without it (or --resume) such a directory is refused."""


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
        if len(self.optim.betas) != 2 or not all(0 <= beta < 1 for beta in self.optim.betas):
            raise ValueError(f"optim.betas={self.optim.betas!r} is out of range: must be two numbers in [0, 1)")
        if self.parallel.sequence_parallel and self.parallel.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp >= 2 (it shards the tokens "
                             "over the TP group), got parallel.tp=1")
        if self.parallel.engine == "plain" and self.parallel.pp > 1:
            raise ValueError(f"parallel.engine=plain holds the whole model on one stage; it needs pp=1, "
                             f"got pp={self.parallel.pp}")

    @property
    def uses_pipeline(self) -> bool:
        return self.parallel.engine == "pipeline" or (self.parallel.engine == "auto" and self.parallel.pp > 1)


def check_deepspeed_config(ds_config: dict[str, Any], config: TrainConfig, source: str) -> None:
    """Refuse, with key, value and allowed range, what DeepSpeed would assert on or we cannot train.

    Checked before any process group exists; the batch-size arithmetic that needs the DP size is
    :func:`batch_sizes`. ``source`` names the JSON file in the messages.
    """
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        value = ds_config.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{key}={value!r} in {source} is out of range: must be an integer >= 1")
    if "train_micro_batch_size_per_gpu" not in ds_config and "train_batch_size" not in ds_config:
        raise ValueError(f"{source} sets neither train_micro_batch_size_per_gpu nor train_batch_size; "
                         f"give train_micro_batch_size_per_gpu (an integer >= 1)")
    zero = ds_config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"zero_optimization={zero!r} in {source} must be an object such as {{\"stage\": 1}}")
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage={stage!r} in {source} is not supported: must be one of "
                         f"{list(ZERO_STAGES)}")
    if config.uses_pipeline and stage not in PIPELINE_ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage={stage} in {source} does not work with pipeline parallelism "
                         f"(parallel.pp={config.parallel.pp}): the pipeline engine allows stages "
                         f"{list(PIPELINE_ZERO_STAGES)}; use stage 1, or pp=1 with parallel.engine=plain")
    if zero.get("compute_grad_norm", True) is not True:
        raise ValueError(f"zero_optimization.compute_grad_norm={zero['compute_grad_norm']!r} in {source} is not "
                         f"supported: the trainer logs the gradient norm; remove the key")
    clipping = ds_config.get("gradient_clipping", 0.0)
    if not isinstance(clipping, int | float) or isinstance(clipping, bool) or not Bound(ge=0).holds(clipping):
        raise ValueError(f"gradient_clipping={clipping!r} in {source} is out of range: must be a finite number "
                         f">= 0 (0: no clipping)")
    if _enabled(ds_config, "fp16"):
        raise ValueError(f"fp16.enabled=true in {source} is not supported: train in fp32 or with "
                         f"bf16.enabled=true")


def measures_grad_norm(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed computes the global gradient norm: ZeRO and the bf16 optimizers do, the plain
    fp32 path does not (the trainer then measures it and clips itself)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0) > 0 or _enabled(ds_config, "bf16", "bfloat16")


def _enabled(ds_config: dict[str, Any], *sections: str) -> bool:
    """A DeepSpeed section such as ``"bf16": {"enabled": true}`` (under any of its names) is on."""
    return any(isinstance(ds_config.get(name), dict) and ds_config[name].get("enabled", False) for name in sections)


def batch_sizes(ds_config: dict[str, Any], dp: int, source: str) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) from the DeepSpeed JSON for ``dp`` data-parallel ranks.

    Any two of train_batch_size = micro x accumulation x dp may be given, or all three if they agree;
    a missing accumulation is 1. The JSON is assumed to have passed :func:`check_deepspeed_config`.
    """
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    steps = ds_config.get("gradient_accumulation_steps")
    total = ds_config.get("train_batch_size")
    if total is not None:
        known = (micro or 1) * (steps or 1) * dp
        if micro is not None and steps is not None and total != known or total % known:
            raise ValueError(f"train_batch_size={total} in {source} does not match train_micro_batch_size_per_gpu="
                             f"{micro} x gradient_accumulation_steps={steps} x dp={dp}: must be a multiple "
                             f"of {known}, equal to it when all three are given")
        if micro is None:
            micro = total // known
        else:
            steps = total // known if steps is None else steps
    return micro, steps or 1
