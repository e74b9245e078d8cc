"""The fundamental pruning limit: Gaussian width, the prediction, and its report.

- :mod:`~sparsemil.limit.width` -- gw(R) = (1/D) sum r_i^2 / (R^2 + r_i^2), r_i = sqrt(2 eps /
  lambda_i), and the root of rho = gw(R(rho));
- :mod:`~sparsemil.limit.predict` -- :func:`predict_limit` (operator + sweep + eps ->
  :class:`LimitPrediction`), the ``limit:`` options, the important-eigenvalue correction;
- :mod:`~sparsemil.limit.report` / :mod:`~sparsemil.limit.plots` -- ``limit.json`` and plots.
"""
