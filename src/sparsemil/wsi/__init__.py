"""Slide files to CLAM/Trident-style feature h5 files, and attention heatmaps.

Modules: :mod:`~sparsemil.wsi.slide` (open slides, magnification -> level and read size),
:mod:`~sparsemil.wsi.tissue` (Otsu on HSV saturation + morphology),
:mod:`~sparsemil.wsi.patching` (level-0 patch grid filtered by tissue fraction),
:mod:`~sparsemil.wsi.backbones` (patch encoders by name: ResNet-50 truncated after layer3,
UNI, UNI2-h, Prov-GigaPath, Virchow, TorchScript; preprocessing, weights, precision),
:mod:`~sparsemil.wsi.vit` (the one plain-torch ViT behind the four pathology encoders),
:mod:`~sparsemil.wsi.extract` (DataLoader over patches, h5 writing, batches, resume, shards),
:mod:`~sparsemil.wsi.heatmap` (per-instance attention drawn over a slide thumbnail).

Submodules import torch/openslide lazily where possible; import them directly.
"""

__all__ = ["backbones", "extract", "heatmap", "patching", "slide", "tissue", "vit"]
