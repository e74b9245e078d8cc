"""``sparsemil prune run --config cfg.yaml --out DIR``: the predicted pruning limit end to end.

Train with L1 -> pruning sweep -> Hessian spectrum (SLQ) -> predicted ratio. Writes
``DIR/limit.json`` (predicted_ratio, actual_ratio per criterion, default_criterion, epsilon,
D, spectrum summary, timings), ``DIR/predict.png`` (theory gw(R) against the actual
(R(rho), rho) curve), ``DIR/acc_loss.png`` (accuracy/loss against ratio, predicted ratio
marked), ``DIR/esd.png`` (the eigenvalue density), plus ``spectrum.json``, ``sweep.csv``,
``history.json`` and ``model.safetensors``. Every file is written atomically.

The config takes the official keys (``lanczos_iter``, ``lanczos_num``, ...) and an optional
``limit:`` section (see :class:`sparsemil.prune.limit.LimitOptions`).
"""

from __future__ import annotations

from pathlib import Path

import typer


def _split_mil_config(path: Path):
    """``(MILTrainConfig | None, PruneConfig)`` from a YAML config.

    A top-level ``mil:`` mapping (the keys of ``sparsemil mil train``'s config, e.g. ``data``,
    ``model``, ``model_kwargs``, ``l1``, ``max_epochs``) makes this a MIL run; the official
    keys ``sparse_epoch``, ``lanczos_iter``, ``lanczos_num``, ``seed`` and the ``limit:``
    section still apply. Without ``mil:`` it is a vision config.
    """
    import yaml

    from sparsemil.errors import SparsemilError
    from sparsemil.prune.config import config_from_dict, load_prune_config
    from sparsemil.train.config import MILTrainConfig

    if not path.is_file():
        raise SparsemilError(f"config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SparsemilError(
            f"config {path}: invalid YAML ({' '.join(str(err).split())})"
        ) from None
    if not isinstance(data, dict) or "mil" not in data:
        return None, load_prune_config(path)
    data = dict(data)
    mil = MILTrainConfig.from_dict(data.pop("mil") or {}, source=f"config {path} [mil]")
    if mil.data is None:
        raise SparsemilError(f"config {path} [mil]: 'data' is required (a bag source)")
    return mil, config_from_dict(data, where=f"config {path}")


def run(
    config: Path = typer.Option(..., "--config", help="YAML config (official keys)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    device: str | None = typer.Option(None, "--device", help="Override the config's device."),
    negative: str | None = typer.Option(
        None, "--negative", help="Non-positive eigenvalues: abs (official) or flat."
    ),
    hessian_samples: int | None = typer.Option(
        None, "--hessian-samples", help="Seeded training subset for the Hessian (default all)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train with L1, sweep, estimate the spectrum and predict the pruning limit."""
    from sparsemil.prune.limit import LimitOptions, run_limit  # registers the limit: section

    mil_cfg, cfg = _split_mil_config(config)
    if device:
        cfg.device = device
        cfg.validate()
    opts = cfg.sections.get("limit") or LimitOptions()
    if negative is not None:
        opts.negative = negative
    if hessian_samples is not None:
        opts.hessian_samples = hessian_samples
    if threads is not None:
        opts.threads = threads
    opts.validate()
    cfg.sections["limit"] = opts
    if mil_cfg is not None:
        from sparsemil.prune.mil_limit import run_mil_limit

        mil_cfg = mil_cfg.override(seed=cfg.seed, progress=not quiet)
        doc = run_mil_limit(
            mil_cfg, out, n_ratios=cfg.sparse_epoch, lanczos_iter=cfg.lanczos_iter,
            lanczos_num=cfg.lanczos_num, negative=opts.negative, progress=not quiet,
        )  # fmt: skip
    else:
        doc = run_limit(cfg, out, progress=not quiet, log=None if quiet else typer.echo)
    pred = doc["predicted_ratio"]
    act = doc["actual_ratio"].get(doc["default_criterion"])
    typer.echo(
        f"predicted ratio {'undefined' if pred is None else f'{pred:.4f}'}; actual "
        f"({doc['default_criterion']}) {'undefined' if act is None else f'{act:.4f}'}; "
        f"epsilon {doc['epsilon']:.4g}; D {doc['D']}; wrote {out / 'limit.json'}"
    )
