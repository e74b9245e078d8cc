"""Experiments built from the library layers below.

- :mod:`~sparsemil.experiments.vision` -- the pruning-limit reproduction (model zoo, config,
  L1 training, ``prune train|sweep|run``);
- :mod:`~sparsemil.experiments.mil_bridge` -- the pruning limit of a trained MIL model;
- :mod:`~sparsemil.experiments.mil_benchmark` -- the classic-MIL benchmark table;
- :mod:`~sparsemil.experiments.demo` -- the main job (``sparsemil demo``).
"""
