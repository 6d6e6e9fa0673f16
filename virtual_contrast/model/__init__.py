"""The model: the paper's residual 3D UNet, fold training and mirrored test-time-augmented prediction.

Modules: ``config`` (input channels, network shape and training options, without torch), ``unet`` (network,
grid check, parameter/FLOP counts), ``data`` (normalised NIfTI → cached float16 arrays → device batches),
``folds`` (cross-validation folds), ``train`` (the loop of one fold, resumable), ``checkpoint`` (``model.pt`` and
``last.pt``: saving, loading, resuming), ``train_log`` (per-epoch log and loss curve), ``schedule`` (learning
rate, divergence guard), ``predict`` (40-pass TTA, one subject), ``runtime`` (device, precision, seeds),
``commands`` (the ``split``, ``train`` and ``predict`` subcommands).
"""
