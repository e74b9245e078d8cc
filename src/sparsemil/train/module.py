"""The LightningModule shared by every MIL model (MMIL-Transformer and torchmil baselines).

Loss = sum of the model's ``compute_loss`` dict (the torchmil contract: bag loss plus any
auxiliary loss, e.g. CLAM's instance loss or DTFD-MIL's tier-1 loss) + ``lmbda * sum |theta|``
over every trainable ``.weight`` and ``.bias`` (:func:`sparsemil.prune.l1.l1_penalty`). Optimiser AdamW, cosine learning-rate schedule over
``max_epochs`` (stepped per epoch).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

from sparsemil.errors import SparsemilError
from sparsemil.mil.factory import bag_probabilities
from sparsemil.mil.registry import model_inputs, registered_spec
from sparsemil.prune.l1 import l1_penalty


def has_padding(batch: dict[str, Any]) -> bool:
    return bool((~batch["mask"].bool()).any())


class MILModule(L.LightningModule):
    """Train / validate / test one MIL model.

    Args:
        model: built by :func:`sparsemil.mil.factory.build_mil_model`.
        n_classes: K (outputs are turned into ``(B, K)`` probabilities).
        lr, weight_decay: AdamW settings.
        max_epochs: cosine schedule length (epochs).
        min_lr: cosine floor.
        lmbda: L1 strength (0 = off).

    Logged per epoch: ``train_loss`` (objective incl. L1), ``val_loss`` (model losses, no L1),
    ``val_acc``, ``val_auc``, ``lr``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        n_classes: int = 2,
        lr: float = 2e-4,
        weight_decay: float = 1e-5,
        max_epochs: int = 100,
        min_lr: float = 0.0,
        lmbda: float = 0.0,
    ) -> None:
        super().__init__()
        registered_spec(model)  # fail early for a model the registry does not know
        self.model = model
        self.n_classes = int(n_classes)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.max_epochs = int(max_epochs)
        self.min_lr = float(min_lr)
        self.lmbda = float(lmbda)
        self._val_probs: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._rng_to_restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ steps
    def _losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        kwargs = model_inputs(self.model, batch)
        out, losses = self.model.compute_loss(batch["Y"], batch["X"], **kwargs)
        if isinstance(out, tuple | list):
            out = out[0]
        if not losses:
            raise RuntimeError(f"{type(self.model).__name__}.compute_loss returned no loss")
        total = torch.stack([v.reshape(()) for v in losses.values()]).sum()
        return out, total, losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, loss, _ = self._losses(batch)
        if self.lmbda > 0:
            loss = loss + self.lmbda * l1_penalty(self.model)
        if not bool(torch.isfinite(loss.detach())):
            slides = ", ".join(map(str, batch.get("slide_id", [])[:3]))
            raise SparsemilError(
                f"training loss is {float(loss.detach())} at epoch {self.current_epoch}, step "
                f"{batch_idx} (bags {slides}); the model diverged; fix: lower 'lr' (now "
                f"{self.lr:g}) or check the features for extreme values"
            )
        b = int(batch["Y"].shape[0])
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=b, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, loss, _ = self._losses(batch)
        b = int(batch["Y"].shape[0])
        # Validation data is not sharded (every process sees all validation bags), so the
        # logged value is identical on every rank and early stopping agrees across ranks.
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=b, prog_bar=True)
        self._val_probs.append(bag_probabilities(out.detach()).float().cpu())
        self._val_labels.append(batch["Y"].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        from sparsemil.train.evaluate import classification_metrics

        probs = torch.cat(self._val_probs).numpy()
        labels = torch.cat(self._val_labels).numpy()
        self._val_probs.clear()
        self._val_labels.clear()
        m = classification_metrics(labels, probs, self.n_classes)
        self.log("val_acc", float(m["accuracy"]), prog_bar=True)
        if np.isfinite(m["auc"]):
            self.log("val_auc", float(m["auc"]))

    def on_train_epoch_start(self) -> None:
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        opt = self.optimizers()
        if not isinstance(opt, list):
            self.log("lr", opt.param_groups[0]["lr"], on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(self.max_epochs, 1), eta_min=self.min_lr
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------ resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sparsemil_rng"] = _get_rng_state()
        if registered_spec(self.model).seeded:  # the model's own generator (MMIL: grouping)
            checkpoint["sparsemil_model_rng"] = self.model.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("sparsemil_rng")
        if registered_spec(self.model).seeded and "sparsemil_model_rng" in checkpoint:
            self.model.set_rng_state(checkpoint["sparsemil_model_rng"])


def _get_rng_state() -> dict[str, Any]:
    """RNG states as tensors / plain types (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": [int(py_state[0]), list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    key = state["numpy_key"].numpy().astype(np.uint32)
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", key, int(state["numpy_pos"]), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
