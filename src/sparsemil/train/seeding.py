"""Scoped seeding: a seed for one block of code, with every global RNG restored afterwards.

Lightning models (torchmil baselines, dropout, DTFD-MIL's random pseudo-bags) draw from the
global torch / NumPy / Python generators. Instead of seeding the process
(``lightning.seed_everything`` also writes environment variables), the trainer and the test
passes run inside :func:`scoped_seed`, which seeds those generators on entry and restores
their previous states on exit -- so a library call never changes its caller's random stream.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def scoped_seed(seed: int) -> Iterator[torch.Generator]:
    """Seed torch (CPU and visible CUDA devices), NumPy and ``random`` with ``seed`` for the
    block; restore all of them afterwards. Yields a CPU ``torch.Generator`` with the same
    seed for DataLoader shuffling and worker seeds.
    """
    seed = int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # inside fork_rng: restored on exit
        np.random.set_state(np.random.RandomState(seed % 2**32).get_state())
        random.setstate(random.Random(seed).getstate())
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
