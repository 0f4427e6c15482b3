"""Training pairs from the SQG shards written by ``tools/nc2npy_mpi.py``, and a synthetic stand-in.

A shard is a float32 ``.npy`` array of consecutive frames ``[n, 2, ny, nx]``; a sample is the
pair (frame i, frame i + lead) inside one shard, normalized per level with the train split's
``normalize_mean.npz`` / ``normalize_std.npz`` (key ``pv``, shape ``[2]``). Shards are
memory-mapped, so a rank reads only the frames its sampler hands it. Layout:
docs/preprocessing.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

HINT = "write the shards with tools/nc2npy_mpi.py (docs/preprocessing.md)"


@dataclass(frozen=True)
class Normalization:
    """Per-level mean and std of the train split, ``[2]`` each."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def load(cls, root: str | Path) -> "Normalization":
        """Read normalize_mean.npz and normalize_std.npz from the shard root."""
        root = Path(root)
        arrays = []
        for name in ("normalize_mean.npz", "normalize_std.npz"):
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(f"statistics file {path} is missing; {HINT}")
            with np.load(path) as stats:
                if "pv" not in stats:
                    raise ValueError(f"{path}: no array 'pv' (found {sorted(stats.files)})")
                arrays.append(np.asarray(stats["pv"], dtype=np.float64))
        mean, std = arrays
        if mean.shape != (2,) or std.shape != (2,):
            raise ValueError(f"{root}: normalization arrays must have shape (2,), found {mean.shape} and {std.shape}")
        if not np.all(std > 0):
            raise ValueError(f"{root / 'normalize_std.npz'}: standard deviations must be > 0, found {std}")
        return cls(mean, std)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """(frames - mean) / std per level for ``[..., 2, ny, nx]``, in float32."""
        return ((frames - self.mean[:, None, None]) / self.std[:, None, None]).astype(np.float32)


class SQGShards(Dataset):
    """(input frame, target frame, lead time in hours) from one split's shards, normalized."""

    def __init__(self, root: str | Path, split: str, lead: int = 1,
                 image_size: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no shard directory at {self.root} (missing meta.json); {HINT}")
        meta = json.loads(meta_path.read_text())
        if split not in meta.get("splits", {}):
            raise ValueError(f"{meta_path}: no split {split!r} (found {sorted(meta.get('splits', {}))})")
        if lead < 1:
            raise ValueError(f"lead must be >= 1 frame, got {lead}")
        self.normalization = Normalization.load(self.root)
        self.lead = lead
        self.lead_hours = lead * meta["dt_seconds"] / 3600.0
        shape = tuple(meta["shape"])
        if image_size is not None and shape[1:] != tuple(image_size):
            raise ValueError(f"{meta_path}: frames are {shape[1]}x{shape[2]} but the model expects "
                             f"{image_size[0]}x{image_size[1]}")
        self.shards = []
        for entry in meta["splits"][split]["shards"]:
            path = self.root / entry["file"]
            try:
                array = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise FileNotFoundError(f"shard {path} listed in {meta_path} is missing; {HINT}") from None
            if array.ndim != 4 or array.shape[1:] != shape or array.shape[0] != entry["frames"]:
                raise ValueError(f"{path}: shape {array.shape}, expected ({entry['frames']}, {', '.join(map(str, shape))})")
            self.shards.append(array)
        # sample k -> (shard, first frame): every frame with a target `lead` frames later in its shard
        self.index = [(s, i) for s, array in enumerate(self.shards) for i in range(array.shape[0] - lead)]
        if not self.index:
            raise ValueError(f"{self.root}/{split}: no shard holds more than lead={lead} frames")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shard, i = self.index[k]
        frames = self.normalization.apply(self.shards[shard][[i, i + self.lead]])
        return torch.from_numpy(frames[0]), torch.from_numpy(frames[1]), torch.tensor(self.lead_hours)


class SyntheticFrames(Dataset):
    """Random normalized frames of the model's shape, for benchmarks and tests (seeded per index)."""

    def __init__(self, length: int, variables: int, image_size: tuple[int, int], seed: int = 0,
                 lead_hours: float = 12.0) -> None:
        self.length, self.shape, self.seed, self.lead_hours = length, (variables, *image_size), seed, lead_hours

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        x = torch.randn(self.shape, generator=gen)
        # a fixed, learnable map (a shift plus damping), so a loss can go down on synthetic data
        return x, 0.9 * x.roll(1, dims=-1), torch.tensor(self.lead_hours)
