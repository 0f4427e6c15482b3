"""The EnSF problem directory: a twin experiment's truth and observations, in per-rank shards.

Layout (written by :mod:`da_plugin.scale.problem_gen`, read by the decomposed run with
``problem_dir=...``)::

    truth_NNNNN.npy   float32 [cycles + 1, slab]: shard N's slab of the truth at t0, then at
                      every analysis time
    obs_NNNNN.npy     float32 [cycles, observed in slab]: the observations of that slab
    meta.json         the experiment's parameters (PROBLEM_FIELDS), the shard bounds
                      "shards": [[start, stop], ...] and each file's SHA-256 "sha256":
                      {name: hex}, verified by every reader of the file; written last

The numbers are those the run computes itself without a problem directory (same seed and
settings). A reader takes only the columns of its own slab from the shards that overlap it, so
the writer's and the reader's rank counts need not agree, and no process holds the whole state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from da_plugin.obs import ObservationOperator, strided_positions
from da_plugin.scale.config import ScaleConfig
from da_plugin.scale.slabs import Slab
from da_plugin.scale.twin import twin_truth
from megavit.checksum import sha256_of, verify

META = "meta.json"
PROBLEM_FIELDS = ("dim", "forcing", "dt", "seed", "spinup_steps", "obs_every", "obs_sigma", "obs_operator",
                  "obs_stride", "cycles")


def problem_fields(config: ScaleConfig) -> dict:
    """The fields a problem directory and the run reading it must agree on."""
    return dict(dim=config.model.dim, forcing=config.model.forcing, dt=config.model.dt, seed=config.seed,
                spinup_steps=config.spinup_steps, obs_every=config.obs.every, obs_sigma=config.obs.sigma,
                obs_operator=config.obs.operator, obs_stride=config.obs.stride, cycles=config.cycles)


def shard_name(kind: str, index: int) -> str:
    """File name of shard ``index`` of the ``kind`` ("truth" or "obs") arrays."""
    return f"{kind}_{index:05d}.npy"


# --- writing -------------------------------------------------------------------------------------------------------

def write_shard(config: ScaleConfig, slab: Slab, obs: ObservationOperator, directory: Path,
                progress: bool = False) -> dict[str, str]:
    """Integrate this rank's slab of the truth (with the other ranks) and stream it, with its
    observations, into shard ``slab.rank``'s .npy files in ``directory``; their SHA-256 by name."""
    truth_file = np.lib.format.open_memmap(directory / shard_name("truth", slab.rank), mode="w+", dtype=np.float32,
                                           shape=(config.cycles + 1, slab.size))
    obs_file = np.lib.format.open_memmap(directory / shard_name("obs", slab.rank), mode="w+", dtype=np.float32,
                                         shape=(config.cycles, obs.size))
    sequence = twin_truth(config, slab, obs, torch.device("cpu"), torch.float32)
    for time_index, (truth, y) in enumerate(tqdm(sequence, total=config.cycles + 1, disable=not progress,
                                                  desc="truth and observations", unit="time")):
        truth_file[time_index] = truth.numpy()
        if time_index:
            obs_file[time_index - 1] = y.numpy()
    truth_file.flush()
    obs_file.flush()
    del truth_file, obs_file
    names = (shard_name("truth", slab.rank), shard_name("obs", slab.rank))
    return {name: sha256_of(directory / name) for name in names}


def write_meta(config: ScaleConfig, world: int, digests: dict[str, str], path: Path) -> None:
    """meta.json of a problem written by ``world`` ranks (shard r holds Slab(dim, r, world))."""
    shards = [[slab.start, slab.stop] for slab in (Slab(config.model.dim, r, world) for r in range(world))]
    path.write_text(json.dumps(dict(problem_fields(config), shards=shards, sha256=dict(sorted(digests.items()))),
                               indent=1))


# --- reading -------------------------------------------------------------------------------------------------------

def read_problem(config: ScaleConfig, slab: Slab, device: torch.device,
                 dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The sequence of :func:`da_plugin.scale.twin.twin_truth`, read for this slab from ``config.problem_dir``."""
    root = Path(config.problem_dir)
    meta = load_meta(root, config)
    stride = config.obs.stride
    observed = strided_positions(slab.start, slab.stop, stride)
    truth = _read_columns(root, meta, "truth", range(slab.start, slab.stop), range)
    obs = _read_columns(root, meta, "obs", observed, lambda start, stop: strided_positions(start, stop, stride))
    to_tensor = lambda rows: torch.from_numpy(np.ascontiguousarray(rows)).to(device=device, dtype=dtype)  # noqa: E731
    yield to_tensor(truth[0]), torch.empty(0)
    for cycle in range(config.cycles):
        yield to_tensor(truth[cycle + 1]), to_tensor(obs[cycle])


def load_meta(root: Path, config: ScaleConfig) -> dict:
    """meta.json of a problem directory, checked field by field against the config."""
    path = root / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"problem_dir {root}: no meta.json (write one with tools/ensf_problem_gen.py)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise ValueError(f"{path}: expected an object with the problem's fields and \"shards\" "
                         f"(tools/ensf_problem_gen.py writes it), found {type(meta).__name__}")
    expected = problem_fields(config)
    for key in PROBLEM_FIELDS:
        if meta.get(key) != expected[key]:
            raise ValueError(f"{path}: {key} is {meta.get(key)!r} but the run is configured with {expected[key]!r} "
                             f"(pass {key}-matching overrides or regenerate the problem)")
    return meta


def _read_columns(root: Path, meta: dict, kind: str, columns: range,
                  shard_columns: Callable[[int, int], range]) -> np.ndarray:
    """``columns`` of the ``kind`` arrays, gathered from the shards that overlap them;
    ``shard_columns`` maps a shard's state bounds to the columns it holds."""
    start, stop = columns.start, columns.stop
    rows = meta["cycles"] + 1 if kind == "truth" else meta["cycles"]
    pieces = []
    for index, (shard_start, shard_stop) in enumerate(meta["shards"]):
        held = shard_columns(shard_start, shard_stop)
        low, high = held.start, held.stop
        if high <= start or low >= stop:
            continue
        path = root / shard_name(kind, index)
        try:
            array = np.load(path, mmap_mode="r")
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{path}: cannot read shard ({err})") from None
        if array.shape != (rows, high - low):
            raise ValueError(f"{path}: shape {array.shape}, expected {(rows, high - low)} from meta.json")
        verify(path, meta.get("sha256", {}).get(path.name), root / META)
        pieces.append(array[:, max(start, low) - low:min(stop, high) - low])
    result = np.concatenate(pieces, axis=1) if pieces else np.empty((rows, 0), np.float32)
    if result.shape[1] != stop - start:
        raise ValueError(f"{root}: the {kind} shards cover {result.shape[1]} of columns [{start}, {stop})")
    return result
