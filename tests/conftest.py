"""Test-session setup and helpers shared by all test files (``from conftest import free_port``)."""

import os
import socket

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; the variable must be set before
# any kernel is defined (at import), so it is set here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
