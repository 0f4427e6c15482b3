"""SQG data: the truth-run netCDF format (`sqg_netcdf`), the training shards (`shards`: memory-mapped
reader with normalization, and their writer), the preprocessing commands (`preprocess`, `split_runs`)
with their statistics (`moments`) and MPI plumbing (`mpi_tools`), and synthetic frames."""

from megavit.data.shards import Normalization, SQGShards, SyntheticFrames

__all__ = ["Normalization", "SQGShards", "SyntheticFrames"]
