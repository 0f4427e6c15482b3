"""Single-GPU training throughput and model FLOP utilisation (MFU) of the SQG ViT configs.

Run:  .venv/bin/python bench/vit_mfu.py --configs sqg64_108m sqg128_1.2b sqg256_2.5b
      .venv/bin/python bench/vit_mfu.py --configs sqg256_2.5b --per-block --checkpoint-every 1
      .venv/bin/python bench/vit_mfu.py --configs tiny --steps 3          (CPU smoke run, seconds)

Plain PyTorch, no DeepSpeed: fp32 master weights with bf16 autocast, AdamW (fused on CUDA),
synthetic frames. Each config is built from configs/vit/<name>.yaml (or a path); the
micro-batch is given per config or found automatically: the largest power of two up to
--max-micro-batch whose warm-up and timed steps run without exhausting GPU memory. After
--warmup steps, each of --steps steps is timed (synchronized) and the median is reported.

Model TFLOP/s = flops_per_sample (matmul FLOPs, 3x forward, no recomputation) x micro-batch /
step time; MFU = that / --peak-tflops. The attention column names the SDPA operator the
dispatcher chose for the config's attention shapes (flash_attention, efficient_attention,
cudnn_attention, ...) and, on CUDA, the attention kernel that ran, read from the torch profiler.
--per-block adds forward and backward time of one transformer block at the same shapes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
from pathlib import Path

import torch
from timing import timed  # bench/timing.py (scripts run from bench/)
from torch.profiler import ProfilerActivity, profile

from megavit.model import ViT, ViTConfig, block_flops, count_parameters, flops_per_sample, load_vit_config, mse_loss
from megavit.model.vit import Block

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation near full memory
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vit"
H100_SXM_BF16_DENSE_TFLOPS = 989.0
ATTENTION_KERNEL = re.compile(r"flash|fmha|attn|attention|sdpa", re.IGNORECASE)


def config_path(name: str) -> Path:
    """A config given by name (configs/vit/<name>.yaml) or by path."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else CONFIGS / f"{name}.yaml"


def synthetic_batch(config: ViTConfig, micro_batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(frames, lead_time, target) of random normalized data."""
    shape = (micro_batch, config.in_vars, *config.image_size)
    return torch.randn(shape, device=device), torch.ones(micro_batch, device=device), torch.randn(shape, device=device)


def train_step(model: ViT, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> None:
    """One bf16-autocast forward, backward and AdamW step."""
    frames, lead_time, target = batch
    with torch.autocast(frames.device.type, dtype=torch.bfloat16):
        loss = mse_loss(model(frames, lead_time), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_steps(model: ViT, optimizer: torch.optim.Optimizer, config: ViTConfig, micro_batch: int,
                device: torch.device, args: argparse.Namespace) -> float | None:
    """Median step milliseconds at ``micro_batch`` after the warm-up steps; None if GPU memory ran out."""
    try:
        batch = synthetic_batch(config, micro_batch, device)
        for _ in range(args.warmup):
            train_step(model, optimizer, batch)
        return statistics.median(timed(lambda: train_step(model, optimizer, batch), device, args.steps, warmup=False))
    except torch.cuda.OutOfMemoryError:
        pass
    # outside the except block, so that the traceback's frames (holding activations) are gone
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return None


def candidate_sizes(requested: str, largest: int) -> list[int]:
    """The requested micro-batch, or for 'auto' the powers of two from ``largest`` down to 1."""
    if requested != "auto":
        return [int(requested)]
    return [1 << k for k in range(largest.bit_length() - 1, -1, -1)]


def attention_used(block: Block, tokens: torch.Tensor) -> str:
    """The SDPA operator (and, on CUDA, the kernel) that one attention forward of ``block`` ran."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tokens.is_cuda else [])
    with profile(activities=activities) as prof, torch.autocast(tokens.device.type, dtype=torch.bfloat16):
        block.attn(block.norm1(tokens))
    events = prof.events()
    ops = sorted({e.name.removeprefix("aten::_scaled_dot_product_") for e in events
                  if e.name.startswith("aten::_scaled_dot_product_")})
    kernels = sorted({e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                      and ATTENTION_KERNEL.search(e.name)})
    used = "+".join(ops) or block.attn.backend
    return f"{used} [{kernels[0][:60]}]" if kernels else used


def per_block_ms(block: Block, tokens: torch.Tensor, steps: int) -> tuple[float, float]:
    """Median forward and backward milliseconds of one block on ``tokens`` [B, T, D] (bf16 autocast)."""
    x = tokens.detach().requires_grad_()
    grad = torch.randn_like(x)

    def forward() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return block(x)

    forward_ms = statistics.median(timed(forward, x.device, steps))
    total_ms = statistics.median(timed(lambda: forward().backward(grad), x.device, steps))
    return forward_ms, total_ms - forward_ms


def measure(name: str, micro_batch: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Build one config, pick its micro-batch, time its training steps; one result row."""
    overrides = [f"model.checkpoint_every={args.checkpoint_every}"]
    if args.attention_backend:
        overrides.append(f"model.attention_backend={args.attention_backend}")
    config = load_vit_config(config_path(name), overrides)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:
        model = ViT(config)
    if args.compile:
        for block in model.blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=1e-5, fused=cuda)
    for size in candidate_sizes(micro_batch, args.max_micro_batch):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)  # forget failed larger sizes
        step_ms = timed_steps(model, optimizer, config, size, device, args)
        if step_ms is not None:
            break
        print(f"  {name}: micro-batch {size} runs out of GPU memory")
    else:
        raise RuntimeError(f"{name}: no micro-batch in {candidate_sizes(micro_batch, args.max_micro_batch)} fits")
    tflops = flops_per_sample(config) * size / (step_ms * 1e-3) / 1e12
    tokens = torch.randn(size, config.num_tokens, config.embed_dim, device=device)
    row = {
        "config": config_path(name).stem, "params": count_parameters(model), "micro_batch": size,
        "checkpoint_every": config.checkpoint_every, "compile": args.compile, "step_ms": step_ms,
        "samples_per_s": size / (step_ms * 1e-3), "model_tflops": tflops, "mfu": tflops / args.peak_tflops,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
        "attention": attention_used(model.blocks[0], tokens),
    }
    if args.per_block:
        forward_ms, backward_ms = per_block_ms(model.blocks[0], tokens, args.steps)
        row |= {"block_forward_ms": forward_ms, "block_backward_ms": backward_ms,
                "block_forward_tflops": block_flops(config) * size / (forward_ms * 1e-3) / 1e12}
    del model, optimizer, tokens
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict], per_block: bool) -> None:
    print(f"{'config':<13} {'params':>8} {'mb':>4} {'ckpt':>4} {'step ms':>9} {'samples/s':>10} {'TFLOP/s':>8} "
          f"{'MFU %':>6} {'peak GB':>8}  attention")
    for r in rows:
        memory = f"{r['peak_memory_gb']:8.1f}" if r["peak_memory_gb"] is not None else f"{'-':>8}"
        print(f"{r['config']:<13} {r['params'] / 1e6:7.1f}M {r['micro_batch']:>4} {r['checkpoint_every']:>4} "
              f"{r['step_ms']:9.1f} {r['samples_per_s']:10.1f} {r['model_tflops']:8.1f} {100 * r['mfu']:6.1f} "
              f"{memory}  {r['attention']}")
    if per_block:
        print(f"\n{'config':<13} {'mb':>4} {'block fwd ms':>13} {'block bwd ms':>13} {'fwd TFLOP/s':>12}")
        for r in rows:
            print(f"{r['config']:<13} {r['micro_batch']:>4} {r['block_forward_ms']:13.2f} "
                  f"{r['block_backward_ms']:13.2f} {r['block_forward_tflops']:12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["sqg64_108m", "sqg128_1.2b", "sqg256_2.5b"],
                        help="config names in configs/vit/ or YAML paths")
    parser.add_argument("--micro-batch", nargs="+", default=["auto"],
                        help="one value for all configs or one per config: an integer or 'auto'")
    parser.add_argument("--max-micro-batch", type=int,
                        help="largest size 'auto' tries (default 64 on CUDA; 4 on CPU, which never runs out of memory)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="recompute every k-th block (0: off)")
    parser.add_argument("--attention-backend", choices=["sdpa", "flash", "math"], help="override the configs'")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="peak bf16 dense TFLOP/s of the device, for MFU (default: H100 SXM)")
    parser.add_argument("--per-block", action="store_true", help="also time one block's forward and backward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if len(args.micro_batch) not in (1, len(args.configs)):
        parser.error(f"--micro-batch takes 1 or {len(args.configs)} values, got {len(args.micro_batch)}")
    if any(m != "auto" and not m.isdigit() for m in args.micro_batch):
        parser.error(f"--micro-batch values must be integers or 'auto', got {args.micro_batch}")
    device = torch.device(args.device)
    if args.max_micro_batch is None:
        args.max_micro_batch = 64 if device.type == "cuda" else 4
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}; MFU against a peak of {args.peak_tflops:g} TFLOP/s (bf16 dense)")
    sizes = args.micro_batch * len(args.configs) if len(args.micro_batch) == 1 else args.micro_batch
    rows = [measure(config, size, args, device) for config, size in zip(args.configs, sizes)]
    print_table(rows, args.per_block)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "peak_tflops": args.peak_tflops,
                                        "steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
