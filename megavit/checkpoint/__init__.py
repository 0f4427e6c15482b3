"""Checkpoint layout metadata and atomic tag bookkeeping around DeepSpeed's checkpoint files."""

from megavit.checkpoint.layout import LATEST, read_layout, resolve_tag, write_layout

__all__ = ["LATEST", "read_layout", "resolve_tag", "write_layout"]
