"""Compatibility path: the Hessian operator lives in :mod:`sparsemil.curvature.hvp`.

``from sparsemil.prune.hvp import HessianOperator`` keeps working (a documented re-export).
"""

from sparsemil.curvature.hvp import (  # noqa: F401
    DistributedHessianOperator,
    HessianOperator,
    hessian_parameters,
)
