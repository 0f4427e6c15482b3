"""Training shards on disk: the format `megavit.data.preprocess` writes and the trainer reads.

A split directory (``train/``, ``val/``, ``test/``) holds shards, float32 ``.npy`` arrays of
consecutive frames ``[n, 2, ny, nx]``; beside them ``normalize_mean.npz`` / ``normalize_std.npz``
(key ``pv``, per-level statistics of the train split, shape ``[2]``), ``climatology.npz`` (key
``pv``, the train split's time mean, ``[2, ny, nx]``) and ``meta.json`` (layout, time step, days,
shards, sources). The writer side (`Shard`, `new_shard`, `write_statistics`, `metadata`,
`write_metadata`) and the reader side (`SQGShards`, `Normalization`) share the names below.
A sample is the pair (frame i, frame i + lead) inside one shard, normalized per level; shards
are memory-mapped, so a rank reads only the frames its sampler hands it. The reader names the file
of anything it cannot use: a truncated or damaged file, and NaN or infinite values in the
statistics or in a frame it reads. Layout: docs/preprocessing.md.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from megavit.checksum import verify
from megavit.data.sqg_netcdf import DAY, Timeline

HINT = "write the shards with tools/nc2npy_mpi.py (docs/preprocessing.md)"
SPLITS = ("train", "val", "test")
KEY = "pv"  # the array's name in every statistics file
MEAN_FILE, STD_FILE, CLIMATOLOGY_FILE = "normalize_mean.npz", "normalize_std.npz", "climatology.npz"
STATISTICS = (MEAN_FILE, STD_FILE, CLIMATOLOGY_FILE)
META_FILE = "meta.json"
LAYOUT = "each shard is a float32 C-order .npy array [frame, level, y, x] of consecutive frames"
UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile)
"""What numpy raises on a truncated or damaged .npy/.npz file."""


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class Shard:
    """Frames [start, stop) of a time line, stored as shard `index` of `split`."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """Path of the shard file relative to the shard directory."""
        return f"{self.split}/shard_{self.index:05d}.npy"


def new_shard(path: str | Path, frames: int, grid: Sequence[int]) -> np.memmap:
    """A shard file of `frames` float32 frames of shape `grid` (z, y, x), memory-mapped for writing."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(frames, *grid))


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez with fixed member timestamps, so equal arrays give byte-identical files."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


def write_statistics(directory: str | Path, mean: np.ndarray, std: np.ndarray, climatology: np.ndarray) -> None:
    """The train split's statistics files in `directory`: per-level mean and std, per-point time mean."""
    for name, value in ((MEAN_FILE, mean), (STD_FILE, std), (CLIMATOLOGY_FILE, climatology)):
        save_npz(Path(directory) / name, {KEY: value})


def metadata(timeline: Timeline, splits: Mapping[str, tuple[int, int]], shards: Sequence[Shard],
             days: Mapping[str, float], num_shards: int, digests: Mapping[str, str]) -> dict[str, Any]:
    """Everything a reader needs besides the arrays: layout, time step, days, shards, checksums, sources.

    `splits` maps each split to its frames [a, b) of `timeline`; `days` are the day bounds asked
    for; `digests` the SHA-256 of every shard and statistics file by relative path.
    """
    first_run = timeline.runs[0]
    entries = {}
    for split, (a, b) in splits.items():
        listed = [{"file": s.name, "frames": s.stop - s.start, "first_frame": s.start - a, "sha256": digests[s.name],
                   "time_seconds": [float(timeline.times[s.start]), float(timeline.times[s.stop - 1])]}
                  for s in shards if s.split == split]
        entries[split] = {"frames": b - a, "first_day": float(timeline.days[a]), "shards": listed}
    return {
        "variable": KEY,
        "units": first_run.units,
        "layout": LAYOUT,
        "shape": list(timeline.grid),
        "levels": first_run.levels,
        "dt_seconds": timeline.step,
        "days": dict(days),
        "num_shards": num_shards,
        "statistics": {"files": list(STATISTICS), "key": KEY, "split": "train", "dtype": "float64",
                       "normalize_shape": [timeline.grid[0]], "climatology_shape": list(timeline.grid),
                       "sha256": {name: digests[name] for name in STATISTICS}},
        "splits": entries,
        "sources": [{"path": os.path.abspath(run.path), "frames": len(run.times),
                     "first_day": float(run.times[0] / DAY)} for run in timeline.runs],
        "attributes": first_run.attributes,
    }


def write_metadata(directory: str | Path, meta: Mapping[str, Any]) -> None:
    """meta.json in `directory`: the file that vouches for the shards, published last."""
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Normalization:
    """Per-level mean and std of the train split, ``[2]`` each."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def load(cls, root: str | Path) -> Normalization:
        """Read normalize_mean.npz and normalize_std.npz from the shard root."""
        root = Path(root)
        arrays = []
        for name in (MEAN_FILE, STD_FILE):
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(f"statistics file {path} is missing; {HINT}")
            try:
                with np.load(path) as stats:
                    names = sorted(stats.files)
                    value = np.asarray(stats[KEY], dtype=np.float64) if KEY in names else None
            except UNREADABLE as err:
                raise ValueError(f"statistics file {path} cannot be read (truncated or damaged?): {err}") from None
            if value is None:
                raise ValueError(f"{path}: no array {KEY!r} (found {names})")
            arrays.append(value)
        mean, std = arrays
        if mean.shape != (2,) or std.shape != (2,):
            raise ValueError(f"{root}: normalization arrays must have shape (2,), found {mean.shape} and {std.shape}")
        if not np.all(np.isfinite(mean)):
            raise ValueError(f"{root / MEAN_FILE}: means must be finite, found {mean}")
        if not np.all(np.isfinite(std) & (std > 0)):
            raise ValueError(f"{root / STD_FILE}: standard deviations must be finite and > 0, found {std}")
        return cls(mean, std)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """(frames - mean) / std per level for ``[..., 2, ny, nx]``, in float32."""
        return ((frames - self.mean[:, None, None]) / self.std[:, None, None]).astype(np.float32)


class SQGShards(Dataset):
    """(input frame, target frame, lead time in hours) from one split's shards, normalized.

    With ``verify_checksums`` every shard of the split and the statistics files are read once and
    compared with the SHA-256 that meta.json lists (directories written before checksums were
    recorded list none and are not checked).
    """

    def __init__(self, root: str | Path, split: str, lead: int = 1,
                 image_size: tuple[int, int] | None = None, verify_checksums: bool = True) -> None:
        self.root = Path(root)
        meta_path = self.root / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no shard directory at {self.root} (missing meta.json); {HINT}")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_path} is not valid JSON (truncated?): {err}; {HINT}") from None
        if split not in meta.get("splits", {}):
            raise ValueError(f"{meta_path}: no split {split!r} (found {sorted(meta.get('splits', {}))})")
        if lead < 1:
            raise ValueError(f"lead must be >= 1 frame, got {lead}")
        if verify_checksums:
            for name, digest in meta.get("statistics", {}).get("sha256", {}).items():
                if (self.root / name).is_file():
                    verify(self.root / name, digest, meta_path)
        self.normalization = Normalization.load(self.root)
        self.split = split
        self.lead = lead
        self.lead_hours = lead * meta["dt_seconds"] / 3600.0
        shape = tuple(meta["shape"])
        if image_size is not None and shape[1:] != tuple(image_size):
            raise ValueError(f"{meta_path}: frames are {shape[1]}x{shape[2]} but the model expects "
                             f"{image_size[0]}x{image_size[1]}")
        self.shards, self.paths = [], []
        for entry in meta["splits"][split]["shards"]:
            path = self.root / entry["file"]
            try:
                array = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise FileNotFoundError(f"shard {path} listed in {meta_path} is missing; {HINT}") from None
            except UNREADABLE as err:  # a truncated file no longer holds the header's frames
                raise ValueError(f"shard {path} cannot be read (truncated or damaged?): {err}; {HINT}") from None
            if array.ndim != 4 or array.shape[1:] != shape or array.shape[0] != entry["frames"]:
                expected = ", ".join(map(str, (entry["frames"], *shape)))
                raise ValueError(f"{path}: shape {array.shape}, expected ({expected})")
            if verify_checksums:
                verify(path, entry.get("sha256"), meta_path)
            self.shards.append(array)
            self.paths.append(path)
        # sample k -> (shard, first frame): every frame with a target `lead` frames later in its shard
        self.index = [(s, i) for s, array in enumerate(self.shards) for i in range(array.shape[0] - lead)]
        if not self.index:
            raise ValueError(f"{self.root}/{split}: no shard holds more than lead={lead} frames")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ``k``; a NaN or infinite value in either frame stops with the split, file and frame."""
        shard, i = self.index[k]
        frames = self.normalization.apply(self.shards[shard][[i, i + self.lead]])
        if not np.isfinite(frames).all():
            bad = i if not np.isfinite(frames[0]).all() else i + self.lead
            raise ValueError(f"{self.split} split: shard {self.paths[shard]} holds NaN or infinite values in frame "
                             f"{bad}; {HINT}")
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
