"""Compatibility path: the pruning-limit prediction lives in :mod:`sparsemil.limit.predict`.

``from sparsemil.prune.limit import predict_limit`` keeps working (a documented re-export).
"""

from sparsemil.limit.predict import LimitOptions, predict_limit  # noqa: F401
