"""The vision reproduction of the pruning-limit paper: models, config, L1 training, runs."""
