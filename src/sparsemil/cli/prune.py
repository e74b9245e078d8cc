"""``sparsemil prune`` sub-commands: ``train``, ``sweep``, ``export`` (and ``run``).

- ``sparsemil prune train --config cfg.yaml --out DIR`` -- L1-penalised training; writes
  ``DIR/model.safetensors`` (weights + JSON metadata), ``DIR/config.json``, ``DIR/history.json``.
- ``sparsemil prune sweep --config cfg.yaml --checkpoint CKPT --out DIR`` -- the pruning sweep
  over ``sparse_epoch`` ratios; writes ``DIR/sweep.csv``, ``DIR/sweep.json`` (dense metrics and
  the actual ratio of every criterion), ``DIR/sweep.png`` and ``DIR/pruned_sparse.safetensors``
  (the model pruned at the configured criterion's ratio, compressed), printing dense vs sparse
  bytes.
- ``sparsemil prune export --checkpoint CKPT --ratio R --out FILE`` -- prune and save compressed.

Every output is written atomically. ``run`` lives in :mod:`sparsemil.cli.prune_run`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from sparsemil.cli import prune_mil, prune_run

app = typer.Typer(help="prune commands.", no_args_is_help=True)


@app.command("train")
def train(
    config: Path = typer.Option(..., "--config", help="YAML config (official keys)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    device: str | None = typer.Option(None, "--device", help="Override the config's device."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a model of the zoo with the L1 penalty and save it as safetensors."""
    from sparsemil.prune.config import load_prune_config
    from sparsemil.prune.export import save_checkpoint
    from sparsemil.prune.l1 import model_metadata, train_from_config
    from sparsemil.utils.io import atomic_write_json

    cfg = load_prune_config(config)
    if device:
        cfg.device = device
        cfg.validate()
    model, data, hist = train_from_config(cfg, progress=not quiet)
    out.mkdir(parents=True, exist_ok=True)
    meta = model_metadata(cfg, data)
    meta["final_test_acc"] = hist["test_acc"][-1] if hist["test_acc"] else None
    save_checkpoint(out / "model.safetensors", model.cpu(), meta)
    atomic_write_json(out / "config.json", cfg.to_dict())
    atomic_write_json(out / "history.json", hist)
    acc = meta["final_test_acc"]
    typer.echo(
        f"trained {cfg.model} on {data.name} for {cfg.epoch} epochs in "
        f"{hist['seconds']:.1f}s; test acc {acc if acc is None else f'{acc:.4f}'}; "
        f"wrote {out / 'model.safetensors'}"
    )


@app.command("sweep")
def sweep(
    config: Path = typer.Option(..., "--config", help="YAML config (official keys)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="model.safetensors from train."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    device: str | None = typer.Option(None, "--device", help="Override the config's device."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Sweep `sparse_epoch` pruning ratios; write CSV, JSON, PNG and the sparse model."""
    from sparsemil.data.vision import load_vision_dataset
    from sparsemil.prune.config import load_prune_config
    from sparsemil.prune.export import load_checkpoint, save_sparse
    from sparsemil.prune.magnitude import prune_model
    from sparsemil.prune.plots import plot_sweep
    from sparsemil.prune.sweep import vision_sweep
    from sparsemil.utils.io import atomic_write_json

    cfg = load_prune_config(config)
    if device:
        cfg.device = device
        cfg.validate()
    model, meta = load_checkpoint(checkpoint, device=cfg.resolved_device())
    data = load_vision_dataset(cfg.dataset, cfg.data_path, subset=cfg.subset, seed=cfg.seed)
    if tuple(meta["in_shape"]) != data.in_shape:
        from sparsemil.errors import SparsemilError

        raise SparsemilError(
            f"checkpoint {checkpoint}: input shape {meta['in_shape']} does not "
            f"match dataset {data.name} {list(data.in_shape)}"
        )
    res = vision_sweep(
        model,
        data,
        n_ratios=cfg.sparse_epoch,
        batch_size=cfg.eval_batch_size,
        loss_batch_size=cfg.batch_size,
        progress=not quiet,
    )
    summary = res.summary(eps=cfg.loss_eps)
    summary["criterion"] = cfg.actual_criterion
    summary["loss_eps"] = (
        cfg.loss_eps if cfg.loss_eps is not None else res.dense.get("train_loss_std")
    )
    out.mkdir(parents=True, exist_ok=True)
    res.to_csv(out / "sweep.csv")
    plot_sweep(
        res, out / "sweep.png", actual=summary["actual_ratio"], title=f"{cfg.model} on {data.name}"
    )
    ratio = summary["actual_ratio"].get(cfg.actual_criterion)
    if ratio is not None:
        prune_model(model, ratio)
        sizes = save_sparse(out / "pruned_sparse.safetensors", model.cpu(), meta)
        summary["export"] = {"ratio": ratio, **sizes}
        typer.echo(
            f"pruned at {ratio:.3f} ({cfg.actual_criterion}): dense "
            f"{sizes['dense_bytes']} bytes -> sparse {sizes['sparse_bytes']} bytes "
            f"({sizes['sparse_bytes'] / sizes['dense_bytes']:.2%})"
        )
    atomic_write_json(out / "sweep.json", summary)
    parts = ", ".join(
        f"{k}={'undefined' if v is None else f'{v:.3f}'}"
        for k, v in summary["actual_ratio"].items()
    )
    typer.echo(
        f"dense test acc {res.dense['test_acc']:.4f}; actual ratio: {parts}; "
        f"wrote {out / 'sweep.csv'}"
    )


@app.command("export")
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="model.safetensors from train."),
    ratio: float = typer.Option(..., "--ratio", help="Pruning ratio in [0, 1]."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
) -> None:
    """Prune a checkpoint globally by magnitude and save it in the compressed format."""
    from sparsemil.prune.export import load_checkpoint, save_sparse
    from sparsemil.prune.magnitude import prune_model

    model, meta = load_checkpoint(checkpoint)
    prune_model(model, ratio)
    sizes = save_sparse(out, model, meta)
    typer.echo(
        f"dense {sizes['dense_bytes']} bytes -> sparse {sizes['sparse_bytes']} bytes "
        f"({sizes['sparse_bytes'] / sizes['dense_bytes']:.2%}); wrote {out}"
    )


# ---------------------------------------------------------------------------------------------
# `sparsemil prune run` (pruning-limit issue): implemented in sparsemil/cli/prune_run.py, which
# that issue owns. Registered here, unconditionally.
app.command("run")(prune_run.run)
app.command("mil")(prune_mil.mil)
