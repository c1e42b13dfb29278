"""Test-session settings shared by every test module."""

import os

import torch

# pytest-xdist runs one process per core: more than one torch thread per process oversubscribes the cores, and
# OpenMP's spin-waiting then slows small tensor ops by an order of magnitude.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
