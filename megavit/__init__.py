"""megavit: a tensor/pipeline/sequence-parallel Vision Transformer stack for SQG surrogates."""

__version__ = "0.1.0"
