"""`fgscope probe`: where does (fine-grained) information live? Linear probes at every depth.

For each selected layer the images' features are pooled on the fly while the model runs
(`capture(..., on_record=...)`, so memory is n x dim, never the raw maps):

- `avg`, `max`: global average / max pooling, (N, C, H, W) -> (N, C); vectors pass through.
- `bilinear`: B-CNN second-order pooling (`metrics.bilinear_pool`: mean of x x^T over
  positions, signed square root, L2 norm). Layers with more than `BILINEAR_CHANNELS`
  channels are first reduced with a fixed Gaussian random projection P (seeded; a 1x1
  convolution), so z = P (sum x x^T) P^T: a random linear sketch of the full bilinear matrix.
  The matrix is symmetric, so its upper triangle is kept: k (k + 1) / 2 dims for k channels.
- `hypercolumn`: cumulative FPN-like fusion. The row at layer k fuses every selected map up
  to and including k: each map is resized to one grid (the largest map among the selected
  layers, capped at `HYPERCOLUMN_GRID` x `HYPERCOLUMN_GRID`; per axis, a shorter map is
  upsampled bilinearly and a longer one area-averaged), the maps are concatenated along
  channels (`metrics.hypercolumns`) and averaged over the grid. After global averaging this is close
  to the concatenation of each layer's average, so the row measures what fusing depths adds
  over one layer, not spatial alignment.

A linear probe then predicts the class from each feature set: multinomial logistic regression
with L2 (scikit-learn `LogisticRegression`, lbfgs, C = `c`) on standardised features (the
`StandardScaler` is fit inside each training fold, via a `Pipeline`), scored by stratified
k-fold cross-validation with a fixed seed. Accuracy is reported as mean and std over folds,
for the fine labels (the ImageFolder classes) and, with a fine -> coarse map, for the coarse
labels too. The BLAS pools run single-threaded during the fits: these small problems are
fastest that way and multi-threaded BLAS slowed them down 10-50x on a busy 2-core machine.

`--from-dump DIR` reads the features from a `fgscope dump` folder instead of running the model
(`fgscope.probe.dumped`: which dump poolings give which probe poolings, and what differs).
"""

from __future__ import annotations

from fgscope._lazy import lazy_exports

_EXPORTS = {
    "POOLS": "features",
    "GRANULARITIES": "features",
    "BILINEAR_CHANNELS": "features",
    "HYPERCOLUMN_GRID": "features",
    "ProbeConfig": "run",
    "ProbeRow": "results",
    "ProbeLayer": "features",
    "ProbeResult": "results",
    "Features": "features",
    "load_coarse_map": "labels",
    "chance_level": "labels",
    "cross_validate": "fit",
    "bilinear_features": "features",
    "hypercolumn_features": "features",
    "extract_features": "features",
    "probe": "fit",
    "fit_probes": "fit",
    "probe_dump": "dumped",
    "dump_features": "dumped",
    "dump_labels": "dumped",
    "dump_pools": "dumped",
    "dump_manifest_inputs": "run",
    "transfer_accuracy": "fit",
    "run_probe": "run",
    "write_probe_files": "run",
    "probe_figure": "figure",
    "probe_markdown": "run",
    "probe_csv": "run",
    "print_summary": "run",
    "load_probe": "run",
    "model_manifest": "run",
    "check_pools": "features",
    "CSV_COLUMNS": "run",
    "seed_everything": "run",
    "write_manifest_inputs": "run",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
