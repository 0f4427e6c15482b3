"""What a checkpoint directory holds besides DeepSpeed's shards, written so a crash never breaks it.

    checkpoints/
      step0000100/            DeepSpeed's files (model states per TP/PP rank, optimizer shards)
        layout.json           tp, pp, dp, sequence_parallel, engine, stages, step, model config,
                              training data (lead time, normalization); after a conversion
                              also optimizer_state and converted_from
      latest                  the newest complete tag, replaced atomically after layout.json

A tag becomes ``latest`` only after every rank has written its shards and rank 0 has written
``layout.json``, so an interrupted save leaves the previous checkpoint as the one a resume finds.
Converting between layouts needs ``layout.json``: the parallel sizes and the model shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megavit.atomic import write_json_atomic, write_text_atomic

LATEST = "latest"


def write_layout(checkpoint_dir: Path, tag: str, layout: dict[str, Any]) -> None:
    """Record ``layout`` in the tag's directory, then point ``latest`` at the tag."""
    write_json_atomic(checkpoint_dir / tag / "layout.json", layout)
    write_text_atomic(checkpoint_dir / LATEST, tag)


def resolve_tag(checkpoint_dir: Path, tag: str) -> str:
    """The tag ``latest`` names (or ``tag`` itself), checked to be a complete checkpoint."""
    if tag == LATEST:
        pointer = checkpoint_dir / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"no checkpoint to resume in {checkpoint_dir} (no '{LATEST}' file)")
        tag = pointer.read_text().strip()
    if not (checkpoint_dir / tag / "layout.json").is_file():
        found = sorted(p.parent.name for p in checkpoint_dir.glob("*/layout.json")) if checkpoint_dir.is_dir() else []
        raise FileNotFoundError(f"checkpoint {checkpoint_dir / tag} is missing or incomplete (no layout.json); "
                                f"complete tags: {found or 'none'}")
    return tag


def read_layout(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((checkpoint_dir / tag / "layout.json").read_text())
