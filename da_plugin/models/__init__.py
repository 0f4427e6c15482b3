"""Forecast models, picked in configs by ``model.name``."""

from da_plugin.models.lorenz96 import Lorenz96

MODELS = {"lorenz96": Lorenz96}

__all__ = ["Lorenz96", "MODELS"]
