"""Small shared helpers (atomic outputs, seeding)."""

from sparsemil.utils.io import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["atomic_path", "atomic_write_json", "atomic_write_text"]
