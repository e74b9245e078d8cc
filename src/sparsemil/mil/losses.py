"""Instance losses used by the torchmil baselines, where torchmil's own is wrong.

torchmil 1.0.2's ``SmoothTop1SVM`` (CLAM's default instance loss) mis-broadcasts its
targets: CLAM passes targets of shape ``(n, 1)``, so ``delta`` becomes ``(n, 1, 2)`` and the
smooth branch mixes every instance with every other (a silently wrong ``(n, 2)`` loss), while
the hard branch (taken once the instance classifier is confident, ``top1 - top2 >= tau *
log(1000)``) raises a shape error unless exactly two rows take it. CLAM-SB therefore crashes
or trains on a wrong loss. :class:`SmoothTop1SVM` below is the loss of Berrada et al. (2018),
"Smooth Loss Functions for Deep Top-k Classification", for k = 1, and accepts both target
shapes; :func:`sparsemil.mil.factory.build_mil_model` installs it into ``CLAM_SB``.
"""

from __future__ import annotations

import math

import torch


class SmoothTop1SVM(torch.nn.Module):
    """Smooth top-1 multiclass SVM loss, averaged over rows.

    For scores ``x`` ``(n, K)`` and labels ``y``:

    * smooth: ``tau * logsumexp_j((x_j + alpha * [j != y] - x_y) / tau)``;
    * hard: ``max_j(x_j + alpha * [j != y]) - x_y``, used (as in the original) for rows whose
      top score beats the second by at least ``tau * log(thresh)``, where the smooth form is
      numerically close to it.

    Args:
        n_classes: K.
        alpha: margin.
        tau: temperature (> 0).
        thresh: switch to the hard loss when the top-2 gap exceeds ``tau * log(thresh)``.
    """

    def __init__(
        self, n_classes: int = 2, alpha: float = 1.0, tau: float = 1.0, thresh: float = 1e3
    ):
        super().__init__()
        if n_classes < 2 or tau <= 0:
            raise ValueError("SmoothTop1SVM needs n_classes >= 2 and tau > 0")
        self.n_classes, self.alpha, self.tau, self.thresh = (
            int(n_classes),
            float(alpha),
            float(tau),
            float(thresh),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss (a scalar) over the ``n`` rows of ``x`` ``(n, K)``; ``y`` is ``(n,)`` or ``(n, 1)``."""
        if x.ndim != 2 or x.shape[1] != self.n_classes:
            raise ValueError(
                f"expected scores of shape (n, {self.n_classes}), got {tuple(x.shape)}"
            )
        y = y.reshape(-1).long()
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} score rows but {y.shape[0]} targets")
        margin = self.alpha * torch.ones_like(x).scatter_(1, y[:, None], 0.0)
        true = x.gather(1, y[:, None])
        aug = x + margin - true  # (n, K); the true class's entry is 0
        smooth = self.tau * torch.logsumexp(aug / self.tau, dim=1)
        hard = aug.max(dim=1).values
        top2 = x.topk(2, dim=1).values.detach()
        use_hard = (top2[:, 0] - top2[:, 1]) >= self.tau * math.log(self.thresh)
        return torch.where(use_hard, hard, smooth).mean()
