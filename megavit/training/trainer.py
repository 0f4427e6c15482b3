"""Training the SQG ViT with the DeepSpeed engine: pipeline or plain, ZeRO, bf16, checkpoints, logging.

``Trainer.train`` reads like a table of contents: claim the output directory, resume, then per
step ``train_step``, logging, validation and checkpoints. Data order is a pure function of (seed,
micro-step), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from megavit.atomic import write_json_atomic, write_text_atomic
from megavit.checkpoint import read_layout, resolve_tag, write_layout
from megavit.checkpoint.deepspeed_files import CheckpointError, model_states_file
from megavit.config import ConfigError, to_dict
from megavit.data import SQGShards, SyntheticFrames
from megavit.model.pipeline import build_pipeline
from megavit.model.vit import Block, ViT, flops_per_sample, mse_loss
from megavit.parallel import DeepSpeedMPU, ParallelDims, Topology, sequence_parallel_grad_hooks
from megavit.training.config import TrainConfig, batch_sizes, measures_grad_norm
from megavit.training.schedule import warmup_cosine

H100_BF16_PEAK_TFLOPS = 989.0
OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json")
"""What a run writes into train.output_dir."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]  # ((frames, lead_time), target)


def collate(dataset: Dataset, indices: Sequence[int]) -> Batch:
    """The samples ``indices`` of ``dataset`` stacked into one batch."""
    frames, target, lead = (torch.stack(column) for column in zip(*(dataset[int(i)] for i in indices)))
    return (frames, lead), target


def validation_batches(size: int, micro: int, dp: int, dp_rank: int) -> tuple[list[range], range | None]:
    """This DP rank's share of samples [0, size): full micro-batches, then its part of the remainder.

    Global micro-batch g is samples [g micro dp, (g + 1) micro dp), of which DP rank r takes the r-th
    ``micro``; the last ``size mod (micro dp)`` samples are dealt out in blocks of ceil(rest / dp),
    so some ranks may get an empty range. The remainder is None when there is none on any rank.
    Every sample lands in exactly one rank's batches.
    """
    full = size // (micro * dp)
    batches = [range((g * dp + dp_rank) * micro, (g * dp + dp_rank + 1) * micro) for g in range(full)]
    start = full * micro * dp
    if start == size:
        return batches, None
    share = -(-(size - start) // dp)
    first = min(size, start + dp_rank * share)
    return batches, range(first, min(size, first + share))


def existing_outputs(output_dir: Path) -> list[str]:
    """The entries of :data:`OUTPUTS` that ``output_dir`` already holds (another run's, unless resuming)."""
    return [name for name in OUTPUTS if (output_dir / name).exists()]


def checkpoint_damage(tag_dir: Path, model_states: Path) -> str:
    """What is wrong with a checkpoint DeepSpeed could not load: this rank's missing model-states file,
    and the tag's files that are not whole zip archives (torch's format); '' if nothing shows."""
    damaged = [str(path) for path in sorted(tag_dir.glob("*.pt")) if not zipfile.is_zipfile(path)]
    return "".join([f"file {model_states} is missing; " if not model_states.is_file() else "",
                    f"file {', '.join(damaged)} is truncated or damaged; " if damaged else ""])


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
        yield collate(dataset, order[start:start + micro])
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
            raise ConfigError(f"world size {world} is not divisible by tp * pp = {tp} * {pp}; "
                              f"launch a multiple of {tp * pp} ranks or change parallel.tp/parallel.pp")
        self.dims = ParallelDims(tp=tp, dp=world // (tp * pp), pp=pp, world_size=world,
                                 sequence_parallel=config.parallel.sequence_parallel)
        try:
            config.model.check_layout(self.dims)
            batch_sizes(ds_config, self.dims.dp, "the DeepSpeed config")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.topology = Topology(self.dims)
        self.rank = dist.get_rank()
        self.output = Path(config.train.output_dir)
        self.checkpoints = self.output / "checkpoints"
        self.step = 0
        self.last_checkpoint: str | None = None
        self.grad_norm: float | None = None  # measured by _clip_gradients where DeepSpeed measures none

        model = self._build_model(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                      weight_decay=config.optim.weight_decay, fused=device_type == "cuda")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
            s, warmup_steps=config.optim.warmup_steps, total_steps=config.train.steps,
            min_ratio=config.optim.min_lr_ratio))
        self.clipping = float(ds_config.get("gradient_clipping", 0.0))
        self.own_clipping = not measures_grad_norm(ds_config)  # then _clip_gradients measures and clips
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self._engine_config(ds_config),
            mpu=None if config.uses_pipeline else DeepSpeedMPU(self.topology))
        if self.own_clipping:
            optimizer.register_step_pre_hook(lambda *_: self._clip_gradients())
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accumulation = self.engine.gradient_accumulation_steps()
        self.global_batch = self.micro * self.accumulation * self.dims.dp
        self.train_data, self.val_data = self._datasets(config)
        self.flops_per_sample = flops_per_sample(config.model)
        self.peak_tflops = config.train.peak_tflops or (H100_BF16_PEAK_TFLOPS if device_type == "cuda" else None)
        self.writer = None

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
        """The DeepSpeed JSON, with what our layout requires of the pipeline engine and of clipping.

        DeepSpeed's pipeline sends 1/tp of each activation and gradient between stages and
        all-gathers them over TP on arrival (``pipe_partitioned``, ``grad_partitioned``), which
        assumes they are replicated across TP. Under sequence parallelism each TP rank holds its
        own tokens, so the stage boundary must carry each rank's tensor whole.

        Where DeepSpeed measures no gradient norm (no ZeRO, fp32) the trainer clips instead
        (:meth:`_clip_gradients`), so DeepSpeed gets no clipping of its own.
        """
        if self.own_clipping:
            ds_config = dict(ds_config, gradient_clipping=0.0)
        if not (self.config.uses_pipeline and self.dims.sp_enabled):
            return ds_config
        pipeline = dict(ds_config.get("pipeline", {}), pipe_partitioned=False, grad_partitioned=False)
        return dict(ds_config, pipeline=pipeline)

    def _clip_gradients(self) -> None:
        """Global gradient norm of this step, then clipping to ``gradient_clipping`` (an optimizer pre-step hook).

        Runs after the DP reduction, so every DP replica holds the same gradients; as DeepSpeed's
        ZeRO optimizer does, a TP-split parameter counts on every TP rank and a replicated one on TP
        rank 0 only, and the squares are summed over the model-parallel (TP x PP) group. The clip
        factor is DeepSpeed's: min(1, clipping / (norm + 1e-6)). (DeepSpeed's own fp32 clipping
        counts replicated parameters on the first pipeline stage only.)
        """
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None
                 and (self.topology.coord.tp == 0 or getattr(p, "tensor_model_parallel", False))]
        squares = torch.zeros(1, dtype=torch.float32, device=self.engine.device)
        if grads:
            squares += torch.stack([g.detach().float().norm() for g in grads]).pow(2).sum()
        dist.all_reduce(squares, group=self.topology.model_group)
        norm = squares.sqrt()
        if self.clipping > 0:
            factor = torch.clamp(self.clipping / (norm + 1e-6), max=1.0)
            for p in self.engine.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
        self.grad_norm = norm.item()

    def _datasets(self, config: TrainConfig) -> tuple[Dataset, Dataset]:
        model = config.model
        if config.data.synthetic:
            return (SyntheticFrames(config.data.synthetic_samples, model.in_vars, model.image_size, config.train.seed),
                    SyntheticFrames(max(1, config.data.synthetic_samples // 8), model.in_vars, model.image_size,
                                    config.train.seed + 1))
        return tuple(SQGShards(config.data.root, split, config.data.lead, model.image_size,
                               verify_checksums=config.data.verify_checksums) for split in ("train", "val"))

    # -- the loop -------------------------------------------------------------------------------

    def train(self, resume: str | None = None) -> dict[str, float]:
        """Run to ``train.steps``; returns the last logged metrics."""
        if self.config.train.overwrite:
            self.clear_output()
        if resume:
            self.resume(resume)
        self._open_logs(resumed=bool(resume))
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
            lr = self.engine.get_lr()[0]  # the scheduler moves on inside the step: read the LR this step uses
            started = self._now()
            loss = self.train_step(batches)
            seconds = self._now() - started
            self.step += 1
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss} at step {self.step}; stopped without saving. {self._last_good}")
            metrics = self._log_step(loss, lr, seconds)
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
        """Mean loss per sample over the val split, each sample scored once (the same for every layout).

        Each micro-batch's mean loss is weighted by its sample count; the sums of every DP replica
        (counted on its last stage, TP rank 0) are added up over all ranks. Full micro-batches of the
        training size run first, then the remainder as one smaller micro-batch per DP rank: the
        pipeline engine needs every rank in each pass, so a rank without remainder scores one
        sample with weight 0. ``train.eval_batches`` caps the split at that many global micro-batches.
        """
        cap = self.config.train.eval_batches
        size = len(self.val_data) if cap is None else min(len(self.val_data), cap * self.micro * self.dims.dp)
        full, rest = validation_batches(size, self.micro, self.dims.dp, self.topology.coord.dp)
        passes = [(full, [len(b) for b in full])] if full else []
        if rest is not None:
            passes.append(([rest], [len(rest)]) if len(rest) else ([range(1)], [0]))
        totals = torch.zeros(2, dtype=torch.float64, device=self.engine.device)  # weighted loss sum, samples
        for batches, weights in passes:
            losses = self._eval_losses(batches, reshape=len(batches[0]) != self.micro)
            if losses is not None and self.topology.coord.tp == 0:
                for loss, weight in zip(losses, weights, strict=True):
                    totals[0] += loss.double() * weight
                    totals[1] += weight
        dist.all_reduce(totals)
        val_loss = (totals[0] / totals[1]).item()
        if not math.isfinite(val_loss):
            raise NonFiniteLoss(f"validation loss is {val_loss} at step {self.step}. {self._last_good}")
        return val_loss

    def _eval_losses(self, batches: list[range], reshape: bool) -> list[torch.Tensor] | None:
        """Mean loss of each val micro-batch ``batches`` (index ranges); None on ranks that do not hold them.

        ``reshape``: the micro-batch size differs from training's, so the pipeline engine must
        renegotiate the activation shapes between stages before and after.
        """
        loaded = self._to_device(collate(self.val_data, indices) for indices in batches)
        if not self.config.uses_pipeline:
            self.engine.eval()
            with torch.no_grad():
                losses = [mse_loss(self.engine(*inputs), target) for inputs, target in loaded]
            self.engine.train()
            return losses
        if reshape:
            self.engine.reset_activation_shape()
        losses = self.engine.eval_batch(loaded, num_micro_batches=len(batches), reduce_output=None,
                                        bcast_loss=False)
        if reshape:
            self.engine.reset_activation_shape()
        return losses if self.engine.is_last_stage() else None

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
        try:
            saved = read_layout(self.checkpoints, tag)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"checkpoint file {self.checkpoints / tag / 'layout.json'} is not valid JSON "
                                  f"(truncated?): {err}") from None
        current = json.loads(json.dumps(self.layout()))  # tuples as saved
        for key in ("tp", "pp", "dp", "sequence_parallel", "engine", "model", "stages"):
            if key in saved and saved[key] != current.get(key):
                raise ValueError(f"checkpoint {self.checkpoints / tag} was saved with {key}={saved[key]}, "
                                 f"this run has {key}={current.get(key)}; resume with the same layout "
                                 f"(or convert it: convert-checkpoint --format deepspeed)")
        weights_only = not saved.get("optimizer_state", True)
        try:
            path, client_state = self.engine.load_checkpoint(
                str(self.checkpoints), tag=tag, load_module_only=weights_only,
                load_optimizer_states=not weights_only, load_lr_scheduler_states=not weights_only)
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, AssertionError, pickle.UnpicklingError) as err:
            path, reason = None, (str(err).strip().splitlines() or [type(err).__name__])[0]
        else:
            reason = "DeepSpeed found no model file for this rank"
        if path is None:  # DeepSpeed raises on a damaged file, and only warns when it finds none
            tag_dir = self.checkpoints / tag
            model_states = model_states_file(tag_dir, self.dims.tp * self.topology.coord.pp + self.topology.coord.tp)
            raise CheckpointError(f"checkpoint {tag_dir} cannot be loaded: {checkpoint_damage(tag_dir, model_states)}"
                                  f"{reason}")
        self.step = 0 if weights_only else client_state["step"]
        self.last_checkpoint = tag
        if self.rank == 0:
            print(f"megavit-train: resumed from {self.checkpoints / tag} at step {self.step}"
                  + (": weights only, the optimizer and the LR schedule start afresh" if weights_only else ""),
                  file=sys.stderr)

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

    # -- the output directory -------------------------------------------------------------------

    def clear_output(self) -> None:
        """``train.overwrite``: rank 0 removes the previous run's outputs before any rank writes."""
        if self.rank == 0:
            for name in existing_outputs(self.output):
                path = self.output / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        dist.barrier()

    def _open_logs(self, resumed: bool) -> None:
        """Rank 0: config.json, TensorBoard (hiding events after this step) and metrics.jsonl.

        After a resume, metrics.jsonl keeps the entries up to the resumed step, rewritten atomically,
        and records where the run resumed; later entries belong to the steps this run redoes.
        """
        if self.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        write_json_atomic(self.output / "config.json", to_dict(self.config))
        self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=self.step + 1 if resumed else None)
        if not resumed:
            return
        log = self.output / "metrics.jsonl"
        kept = []
        for line in log.read_text().splitlines() if log.is_file() else []:
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
                continue
        kept.append(json.dumps(dict(step=self.step, resumed_from=self.last_checkpoint)))
        write_text_atomic(log, "".join(line + "\n" for line in kept))

    @property
    def _last_good(self) -> str:
        return f"Last good checkpoint: {self.last_checkpoint or 'none'} in {self.checkpoints}"

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

    def _log_step(self, loss: float, lr: float, seconds: float) -> dict[str, float]:
        samples_per_s = self.global_batch / seconds
        tflops = self.flops_per_sample * samples_per_s / self.dims.world_size / 1e12  # per device
        grad_norm = self.grad_norm if self.grad_norm is not None else self.engine.get_global_grad_norm()
        metrics = dict(loss=loss, lr=lr, samples_per_s=samples_per_s, tflops=tflops, grad_norm=float(grad_norm))
        if self.peak_tflops:
            metrics["mfu"] = tflops / self.peak_tflops
        if self.step % self.config.train.log_every == 0:
            for name, value in metrics.items():
                self._scalar(f"train/{name}", value)
        self._record(**metrics)
        return metrics

    def _record(self, **values: float) -> None:
        """Append this step's values to output_dir/metrics.jsonl (rank 0; see :meth:`_open_logs` on resume)."""
        if self.rank == 0:
            with open(self.output / "metrics.jsonl", "a") as log:
                log.write(json.dumps(dict(step=self.step, **values)) + "\n")

    def _scalar(self, name: str, value: float) -> None:
        if self.writer:
            self.writer.add_scalar(name, value, self.step)
