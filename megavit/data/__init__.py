"""SQG training data: memory-mapped shards with normalization, and synthetic frames."""

from megavit.data.shards import Normalization, SQGShards, SyntheticFrames

__all__ = ["Normalization", "SQGShards", "SyntheticFrames"]
