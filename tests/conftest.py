"""Test-session setup shared by all test files."""

import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; the variable must be set before
# any kernel is defined (at import), so it is set here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
