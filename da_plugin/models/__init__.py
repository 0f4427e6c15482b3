"""Forecast models, picked in configs by ``model.name``."""

from da_plugin.models.lorenz96 import Lorenz96
from da_plugin.models.sqg import SQG
from da_plugin.models.surrogate import ViTSurrogate

MODELS = {"lorenz96": Lorenz96, "sqg": SQG, "vit": ViTSurrogate}

__all__ = ["Lorenz96", "MODELS", "SQG", "ViTSurrogate"]
