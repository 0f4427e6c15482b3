"""da_plugin: ensemble data assimilation (EnSF, LETKF) with physical and AI forecast models."""

__version__ = "0.1.0"
