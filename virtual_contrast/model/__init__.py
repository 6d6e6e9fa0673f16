"""The model: the paper's residual 3D UNet, fold training and mirrored test-time-augmented prediction.

Modules: ``unet`` (network, grid check, parameter/FLOP counts), ``data`` (normalised NIfTI → cached float16
arrays → device batches), ``folds`` (cross-validation folds), ``train`` (one fold, resumable), ``predict``
(40-pass TTA, one subject), ``runtime`` (device, precision, seeds), ``toy`` (synthetic subjects for tests),
``commands`` (the ``split``, ``train`` and ``predict`` subcommands).
"""
