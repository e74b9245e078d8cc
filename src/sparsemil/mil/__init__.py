"""MIL models: MMIL-Transformer, sub-bag grouping, official-checkpoint bridge.

``from sparsemil.mil import MMILTransformer`` works; the import of torch happens lazily
on first attribute access, so importing the package itself has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sparsemil.mil.mmil import MMILTransformer
    from sparsemil.mil.official import load_official_checkpoint

__all__ = ["MMILTransformer", "load_official_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "MMILTransformer":
        from sparsemil.mil.mmil import MMILTransformer

        return MMILTransformer
    if name == "load_official_checkpoint":
        from sparsemil.mil.official import load_official_checkpoint

        return load_official_checkpoint
    raise AttributeError(f"module 'sparsemil.mil' has no attribute '{name}'")
