"""sparsemil: multi-level MIL for whole-slide images and the fundamental pruning limit.

Subpackages:
    mil    -- MIL models (MMIL-Transformer), sub-bag grouping, torchmil baselines
    data   -- bag readers, splits, vision datasets
    train  -- Lightning training / evaluation shared by every MIL model
    prune  -- L1 training, global magnitude pruning, sweeps, Hessian spectrum, pruning limit
    wsi    -- slide files to CLAM-style feature h5 files, attention heatmaps
    cli    -- the ``sparsemil`` command line
"""

from sparsemil.errors import SparsemilError

__all__ = ["SparsemilError", "__version__"]
__version__ = "0.1.0"
