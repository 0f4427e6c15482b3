"""Ensemble filters, picked in configs by ``filter.name``; each is a dataclass of hyper-parameters
with an ``analysis(forecast, y, obs, generator)`` method."""

from da_plugin.filters.ensf import EnSF

FILTERS = {"ensf": EnSF}

__all__ = ["EnSF", "FILTERS"]
