"""Lightning training and evaluation shared by every MIL model.

Modules (imported on demand; importing the package loads nothing heavy):
    config    -- :class:`MILTrainConfig`, YAML/JSON loading with unknown-key suggestions
    data      -- config -> validated bags, CV folds, training-fold standardisation
    module    -- :class:`MILModule` (LightningModule: compute_loss sum + L1, AdamW, cosine)
    trainer   -- :func:`fit_fold` (checkpoints, resume, early stopping, CSV logs, DDP)
    evaluate  -- metrics, repeated test passes, per-slide predictions
    cv        -- :func:`run_cv` (k-fold CV, metrics.json)
    benchmark -- the classic-MIL benchmark table
"""
