"""Training the SQG ViT with the DeepSpeed engine: pipeline or plain, ZeRO, bf16, checkpoints, logging.

``Trainer.train`` reads like a table of contents: resume, then per step ``train_step``, logging,
validation and checkpoints. Data order is a pure function of (seed, micro-step), so a resumed
run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from megavit.checkpoint import read_layout, resolve_tag, write_layout
from megavit.config import to_dict
from megavit.data import SQGShards, SyntheticFrames
from megavit.model.pipeline import build_pipeline
from megavit.model.vit import Block, ViT, flops_per_sample, mse_loss
from megavit.parallel import DeepSpeedMPU, ParallelDims, Topology, sequence_parallel_grad_hooks
from megavit.training.config import TrainConfig
from megavit.training.schedule import warmup_cosine

H100_BF16_PEAK_TFLOPS = 989.0


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]  # ((frames, lead_time), target)


def micro_batches(dataset: Dataset, micro: int, dp: int, dp_rank: int, seed: int, first: int = 0,
                  shuffle: bool = True) -> Iterator[Batch]:
    """This DP rank's micro-batches from global micro-step ``first`` on, epoch after epoch.

    Epoch e visits the samples in ``randperm(seed + e)`` order (or in order without shuffle);
    micro-step m of DP rank r takes positions [(m dp + r) micro, (m dp + r + 1) micro) of it.
    """
    per_epoch = len(dataset) // (micro * dp)
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples are fewer than one global micro-batch ({micro} x dp={dp})")
    step = first
    while True:
        epoch, within = divmod(step, per_epoch)
        order = (torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)) if shuffle
                 else torch.arange(len(dataset)))
        start = (within * dp + dp_rank) * micro
        samples = [dataset[int(i)] for i in order[start:start + micro]]
        frames, target, lead = (torch.stack(column) for column in zip(*samples))
        yield (frames, lead), target
        step += 1


class Trainer:
    """Owns the engine, the data and the bookkeeping of one training run (one per rank)."""

    def __init__(self, config: TrainConfig, ds_config: dict) -> None:
        import deepspeed  # slow to import; the CLI's --help should not wait for it

        self.config = config
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
        world = dist.get_world_size()
        tp, pp = config.parallel.tp, config.parallel.pp
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by tp * pp = {tp} * {pp}; "
                             f"launch a multiple of {tp * pp} ranks or change parallel.tp/parallel.pp")
        self.dims = ParallelDims(tp=tp, dp=world // (tp * pp), pp=pp, world_size=world,
                                 sequence_parallel=config.parallel.sequence_parallel)
        config.model.check_layout(self.dims)
        self.topology = Topology(self.dims)
        self.rank = dist.get_rank()
        self.output = Path(config.train.output_dir)
        self.checkpoints = self.output / "checkpoints"
        self.step = 0
        self.last_checkpoint: str | None = None

        model = self._build_model(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                      weight_decay=config.optim.weight_decay, fused=device_type == "cuda")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
            s, warmup_steps=config.optim.warmup_steps, total_steps=config.train.steps,
            min_ratio=config.optim.min_lr_ratio))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self._engine_config(ds_config),
            mpu=None if config.uses_pipeline else DeepSpeedMPU(self.topology))
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accumulation = self.engine.gradient_accumulation_steps()
        self.global_batch = self.micro * self.accumulation * self.dims.dp
        self.train_data, self.val_data = self._datasets(config)
        self.flops_per_sample = flops_per_sample(config.model)
        self.peak_tflops = config.train.peak_tflops or (H100_BF16_PEAK_TFLOPS if device_type == "cuda" else None)
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output / "tensorboard"))
            (self.output / "config.json").write_text(json.dumps(to_dict(config), indent=1))

    def _build_model(self, config: TrainConfig) -> torch.nn.Module:
        if config.uses_pipeline:
            model = build_pipeline(config.model, self.dims, group=self.topology.tp_group, seed=config.train.seed,
                                   partition_method=config.parallel.partition_method)
        else:  # the whole chain on one stage, for ZeRO-2 (which the pipeline engine does not support)
            model = ViT(config.model, group=self.topology.tp_group, sequence_parallel=self.dims.sp_enabled,
                        seed=config.train.seed)
        if self.dims.sp_enabled:  # partial LayerNorm/bias grads summed over TP before ZeRO partitions them
            sequence_parallel_grad_hooks(model, self.topology.tp_group)
        if config.train.compile_blocks:
            for block in (m for m in model.modules() if isinstance(m, Block)):
                block.compile()
        return model

    def _engine_config(self, ds_config: dict) -> dict:
        """The DeepSpeed JSON, with what our layout requires of the pipeline engine.

        DeepSpeed's pipeline sends 1/tp of each activation and gradient between stages and
        all-gathers them over TP on arrival (``pipe_partitioned``, ``grad_partitioned``), which
        assumes they are replicated across TP. Under sequence parallelism each TP rank holds its
        own tokens, so the stage boundary must carry each rank's tensor whole.
        """
        if not (self.config.uses_pipeline and self.dims.sp_enabled):
            return ds_config
        pipeline = dict(ds_config.get("pipeline", {}), pipe_partitioned=False, grad_partitioned=False)
        return dict(ds_config, pipeline=pipeline)

    def _datasets(self, config: TrainConfig) -> tuple[Dataset, Dataset]:
        model = config.model
        if config.data.synthetic:
            return (SyntheticFrames(config.data.synthetic_samples, model.in_vars, model.image_size, config.train.seed),
                    SyntheticFrames(max(1, config.data.synthetic_samples // 8), model.in_vars, model.image_size,
                                    config.train.seed + 1))
        return tuple(SQGShards(config.data.root, split, config.data.lead, model.image_size)
                     for split in ("train", "val"))

    # -- the loop -------------------------------------------------------------------------------

    def train(self, resume: str | None = None) -> dict[str, float]:
        """Run to ``train.steps``; returns the last logged metrics."""
        if resume:
            self.resume(resume)
        run = self.config.train
        batches = self._to_device(micro_batches(self.train_data, self.micro, self.dims.dp, self.topology.coord.dp,
                                                run.seed, first=self.step * self.accumulation))
        bar = tqdm(total=run.steps, initial=self.step, desc="train", unit="step", disable=self.rank != 0
                   or not run.progress)
        metrics: dict[str, float] = {}
        if self.step == 0 and run.eval_every:  # the untrained baseline of the validation curve
            self._scalar("val/loss", val_loss := self.evaluate())
            self._record(val_loss=val_loss)
        while self.step < run.steps:
            started = self._now()
            loss = self.train_step(batches)
            seconds = self._now() - started
            self.step += 1
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss} at step {self.step}; stopped without saving. Last good "
                                    f"checkpoint: {self.last_checkpoint or 'none'} in {self.checkpoints}")
            metrics = self._log_step(loss, seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if (run.eval_every and self.step % run.eval_every == 0) or self.step == run.steps:
                metrics["val_loss"] = self.evaluate()
                self._scalar("val/loss", metrics["val_loss"])
                self._record(val_loss=metrics["val_loss"])
            if (run.save_every and self.step % run.save_every == 0) or self.step == run.steps:
                self.save()
        bar.close()
        if self.writer:
            self.writer.close()
        return metrics

    def train_step(self, batches: Iterator[Batch]) -> float:
        """One optimizer step over ``accumulation`` micro-batches; the loss averaged over DP."""
        if self.config.uses_pipeline:
            return float(self.engine.train_batch(batches))  # averaged over DP and broadcast by DeepSpeed
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)  # on the device: one sync per step
        for _ in range(self.accumulation):
            (frames, lead), target = next(batches)
            loss = mse_loss(self.engine(frames, lead), target)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach() / self.accumulation
        return self._dp_mean(total)

    def evaluate(self) -> float:
        """Mean loss over the first ``eval_batches`` micro-batches of the val split (same every time)."""
        count = self.config.train.eval_batches
        batches = self._to_device(micro_batches(self.val_data, self.micro, self.dims.dp, self.topology.coord.dp,
                                                seed=0, shuffle=False))
        if self.config.uses_pipeline:
            return float(self.engine.eval_batch(batches, num_micro_batches=count))
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        with torch.no_grad():
            for inputs, target in (next(batches) for _ in range(count)):
                total += mse_loss(self.engine(*inputs), target) / count
        self.engine.train()
        return self._dp_mean(total)

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self) -> None:
        """DeepSpeed's shards for this step, then layout.json and ``latest`` (rank 0, after all ranks)."""
        tag = f"step{self.step:07d}"
        self.engine.save_checkpoint(str(self.checkpoints), tag=tag, client_state={"step": self.step},
                                    save_latest=False)
        dist.barrier()
        if self.rank == 0:
            write_layout(self.checkpoints, tag, self.layout())
        dist.barrier()
        self.last_checkpoint = tag

    def resume(self, tag: str) -> None:
        """Load ``tag`` (or the one ``latest`` names) and continue from its step.

        A checkpoint converted without its optimizer state (``optimizer_state: false`` in
        layout.json) gives the weights only: the optimizer and LR schedule start afresh at step 0.
        """
        tag = resolve_tag(self.checkpoints, tag)
        saved, current = read_layout(self.checkpoints, tag), json.loads(json.dumps(self.layout()))  # tuples as saved
        for key in ("tp", "pp", "dp", "sequence_parallel", "engine", "model", "stages"):
            if key in saved and saved[key] != current.get(key):
                raise ValueError(f"checkpoint {self.checkpoints / tag} was saved with {key}={saved[key]}, "
                                 f"this run has {key}={current.get(key)}; resume with the same layout "
                                 f"(or convert it: convert-checkpoint --format deepspeed)")
        weights_only = not saved.get("optimizer_state", True)
        _, client_state = self.engine.load_checkpoint(str(self.checkpoints), tag=tag, load_module_only=weights_only,
                                                      load_optimizer_states=not weights_only,
                                                      load_lr_scheduler_states=not weights_only)
        self.step = 0 if weights_only else client_state["step"]
        self.last_checkpoint = tag
        if self.rank == 0 and weights_only:
            print(f"megavit-train: {self.checkpoints / tag} holds weights only: starting the optimizer and the "
                  f"LR schedule afresh at step 0", file=sys.stderr)

    def layout(self) -> dict:
        """What a checkpoint's shards mean: parallel sizes, engine, stages, model shape and training data."""
        layout = dict(tp=self.dims.tp, pp=self.dims.pp, dp=self.dims.dp, sequence_parallel=self.dims.sp_enabled,
                      engine="pipeline" if self.config.uses_pipeline else "plain", step=self.step,
                      model=to_dict(self.config.model), data=self._data_description())
        if self.config.uses_pipeline:  # the first layer of each stage, then the layer count
            layout["stages"] = [int(bound) for bound in self.engine.module.parts]
        return layout

    def _data_description(self) -> dict:
        """What a forecast needs to know of the training data: normalization and lead time."""
        norm = getattr(self.train_data, "normalization", None)
        return dict(lead_hours=float(self.train_data.lead_hours),
                    normalization=None if norm is None else dict(mean=norm.mean.tolist(), std=norm.std.tolist()))

    # -- helpers --------------------------------------------------------------------------------

    def _to_device(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        device = self.engine.device
        for (frames, lead), target in batches:
            yield ((frames.to(device, self.dtype), lead.to(device, self.dtype)), target.to(device))

    def _dp_mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar tensor over the DP group, read once."""
        tensor = value.reshape(1).clone()
        dist.all_reduce(tensor, group=self.topology.dp_group)
        return tensor.item() / self.dims.dp

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _log_step(self, loss: float, seconds: float) -> dict[str, float]:
        samples_per_s = self.global_batch / seconds
        tflops = self.flops_per_sample * samples_per_s / self.dims.world_size / 1e12  # per device
        metrics = dict(loss=loss, lr=self.engine.get_lr()[0], samples_per_s=samples_per_s, tflops=tflops,
                       grad_norm=float(self.engine.get_global_grad_norm() or float("nan")))
        if self.peak_tflops:
            metrics["mfu"] = tflops / self.peak_tflops
        if self.step % self.config.train.log_every == 0:
            for name, value in metrics.items():
                self._scalar(f"train/{name}", value)
        self._record(**metrics)
        return metrics

    def _record(self, **values: float) -> None:
        """Append this step's values to output_dir/metrics.jsonl (rank 0; a resumed run appends its steps)."""
        if self.rank == 0:
            with open(self.output / "metrics.jsonl", "a") as log:
                log.write(json.dumps(dict(step=self.step, **values)) + "\n")

    def _scalar(self, name: str, value: float) -> None:
        if self.writer:
            self.writer.add_scalar(name, value, self.step)
