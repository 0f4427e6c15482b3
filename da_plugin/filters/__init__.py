"""Ensemble filters, picked in configs by ``filter.name``; each is a dataclass of hyper-parameters
with an ``analysis(forecast, y, obs, generator)`` method mapping ``[N, d]`` to ``[N, d]``."""

from da_plugin.filters.enkf import EnKF
from da_plugin.filters.ensf import EnSF
from da_plugin.filters.letkf import ETKF, LETKF

FILTERS = {"ensf": EnSF, "letkf": LETKF, "etkf": ETKF, "enkf": EnKF}

__all__ = ["EnKF", "EnSF", "ETKF", "LETKF", "FILTERS"]
