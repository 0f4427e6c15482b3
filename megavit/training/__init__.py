"""Training the SQG ViT with DeepSpeed (entry point: megavit/training/train.py)."""
