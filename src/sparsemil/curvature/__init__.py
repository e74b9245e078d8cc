"""Curvature: the Hessian as a linear operator, its backends, and Lanczos/SLQ over it.

- :mod:`~sparsemil.curvature.operator` -- the :class:`CurvatureOperator` protocol (``shape``,
  ``dtype``, ``matmat``, ``@``), :class:`PerBatchCurvatureOperator`, the shared
  ``to_scipy()`` implementation and :class:`DenseOperator` (an explicit matrix);
- :mod:`~sparsemil.curvature.hvp` -- :class:`HessianOperator` (``shape``, ``@``,
  ``to_scipy()``), :class:`DistributedHessianOperator`;
- :mod:`~sparsemil.curvature.slq` -- ``lanczos``, ``slq``, ``spectral_density``,
  ``hutchinson_trace``, ``top_eigenvalues``: free functions over any such operator.

Imports only torch, numpy, scipy and :mod:`sparsemil.errors`.
"""
