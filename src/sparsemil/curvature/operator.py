"""The linear-operator interface of curvature matrices (in the manner of SciPy / curvlinops).

A curvature operator is a symmetric ``D x D`` matrix known only through products:

- :class:`CurvatureOperator` -- the :class:`typing.Protocol` that Lanczos, SLQ, Hutchinson
  and the limit prediction need: ``shape``, ``dtype``, ``matmat(V (D, k)) -> (D, k)`` and
  ``op @ x`` for ``x`` of shape ``(D,)`` or ``(D, k)``;
- :class:`PerBatchCurvatureOperator` -- one that is also a weighted sum over batches of
  named parameters (``params``, ``numels``, ``per_batch_matmat``), as the important-eigenvalue
  correction needs;
- :class:`LinearOperatorBase` -- the shared half of an implementation: given ``dim``,
  ``dtype`` and ``matmat`` it supplies ``shape``, ``matvec``, ``@`` and :meth:`to_scipy`
  (a :class:`scipy.sparse.linalg.LinearOperator`, float64 numpy in and out);
- :class:`DenseOperator` -- an explicit matrix behind the same interface (tests, checks).

:class:`~sparsemil.curvature.hvp.HessianOperator` is the matrix-free implementation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from sparsemil.errors import SparsemilError


@runtime_checkable
class CurvatureOperator(Protocol):
    """A symmetric linear operator on R^D, known through matrix products."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(D, D)``."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the products are computed in."""
        ...

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(D, k)``; returns ``(D, k)`` in ``V``'s dtype."""
        ...

    def __matmul__(self, x: Tensor) -> Tensor:
        """``A @ x`` for ``x`` of shape ``(D,)`` or ``(D, k)``, same shape out."""
        ...


@runtime_checkable
class PerBatchCurvatureOperator(CurvatureOperator, Protocol):
    """A curvature operator ``sum_b w_b A_b`` over batches, on a flat vector of parameters."""

    @property
    def params(self) -> Sequence[Tensor]:
        """The parameters whose flat concatenation indexes the rows, in order."""
        ...

    @property
    def numels(self) -> Sequence[int]:
        """Number of entries of each of :attr:`params`."""
        ...

    def per_batch_matmat(self, V: Tensor) -> Iterator[tuple[float, Tensor]]:
        """Yield ``(w_b, A_b @ V)`` batch by batch (``V``: ``(D, k)``, results float64)."""
        ...


class LinearOperatorBase:
    """``shape``, ``matvec``, ``@`` and :meth:`to_scipy` from ``dim``, ``dtype`` and ``matmat``.

    Subclasses set ``self.dim`` and ``self.dtype`` and implement :meth:`matmat`.
    """

    dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(D, D)``."""
        return (self.dim, self.dim)

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(D, k)``; returns ``(D, k)`` in ``V``'s dtype."""
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(D,)``; returns ``(D,)`` in ``v``'s dtype."""
        if v.shape != (self.dim,):
            raise SparsemilError(f"matvec expects shape ({self.dim},), got {tuple(v.shape)}")
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def __matmul__(self, x: Tensor) -> Tensor:
        """``A @ x`` for a vector ``(D,)`` or a matrix ``(D, k)``: a detached tensor of the
        same shape and dtype as ``x`` (on the operator's device)."""
        if not isinstance(x, Tensor):
            return NotImplemented
        x = x.detach()
        if x.dim() == 1:
            return self.matvec(x).detach()
        if x.dim() == 2:
            return self.matmat(x).detach()
        raise SparsemilError(
            f"operator @ x: x must have shape ({self.dim},) or ({self.dim}, k), "
            f"got {tuple(x.shape)}"
        )

    def to_scipy(self) -> LinearOperator:
        """This operator as a :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in
        and out; products still computed in :attr:`dtype`). Symmetric: ``rmatvec = matvec``.

        E.g. ``scipy.sparse.linalg.eigsh(op.to_scipy(), k=5)``.
        """
        dim = self.dim

        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.tensor(np.asarray(X, dtype=np.float64).reshape(dim, -1))
            return self.matmat(V).detach().to(device="cpu", dtype=torch.float64).numpy()

        def matvec(x: np.ndarray) -> np.ndarray:
            return matmat(x).reshape(-1)

        return LinearOperator(
            (dim, dim),
            matvec=matvec,
            rmatvec=matvec,
            matmat=matmat,
            rmatmat=matmat,
            dtype=np.float64,
        )


class DenseOperator(LinearOperatorBase):
    """Wrap a symmetric (D, D) matrix as a :class:`CurvatureOperator` (float64)."""

    def __init__(self, matrix: Tensor | np.ndarray) -> None:
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64)
        if self.matrix.dim() != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
            raise SparsemilError(
                f"DenseOperator needs a square matrix, got {tuple(self.matrix.shape)}"
            )
        self.dim = int(self.matrix.shape[0])
        self.dtype = torch.float64
        self.num_products = 0

    def matmat(self, V: Tensor) -> Tensor:
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise SparsemilError(f"matmat expects shape ({self.dim}, k), got {tuple(V.shape)}")
        self.num_products += V.shape[1]
        return (self.matrix @ V.to(torch.float64)).to(V.dtype)
