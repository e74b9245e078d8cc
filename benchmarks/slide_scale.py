"""Regenerate docs/results/slide_scale.md: MIL models on a slide-scale synthetic cohort.

The cohort comes from ``sparsemil mil synth`` (Fashion-MNIST images through a fixed PCA
encoder, slides of log-normal size, contiguous tumour regions; see docs/data.md), one per
witness rate on the same slides. Every row trains one model with the same trainer and
recipe (``sparsemil.train.trainer.fit_fold``: AdamW, cosine schedule, bag batch 1, a 10 %
validation hold-out of the training slides, the best validation-loss epoch) on the
cohort's 270 training slides and tests it on its 130 test slides, once per seed:

* MMIL-Transformer with random, sequential and k-means-on-coordinates grouping, sub-bag
  masking 0 and 0.6;
* the torchmil baselines ABMIL, TransMIL, DSMIL, CLAM-SB, DTFD-MIL (each with a CLAM-style
  ``Linear -> ReLU`` instance encoder of the MMIL width, ``feat_ext_dim``).

Per row: bag accuracy and AUC on the test slides, attention localisation AUC (per positive
test slide, ROC AUC of the per-instance attention against the instance labels, averaged;
``sparsemil.train.inference.attention_auc``), wall seconds per training epoch (validation
excluded) and peak memory -- peak RSS of the run's process on CPU, peak allocated CUDA
memory on a GPU -- measured in the same run (each run is its own process). A run that
runs out of memory is reported as such in its row, with the cohort's largest bag.

    python benchmarks/slide_scale.py --accelerator gpu          # full: cpu-size cohort
    python benchmarks/slide_scale.py --reduced                  # CPU-feasible, stated in the table
    python benchmarks/slide_scale.py --reduced --rates 0.05 --seeds 0 --models abmil \
        --n-train 12 --n-test 6 --max-epochs 2 --out /tmp/ss --table /tmp/ss.md  # smoke

Finished runs under ``--out`` are reused (an interrupted benchmark continues); the table is
rewritten after every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

WIDTH = 128  # MMIL embed_dim = the baselines' instance-encoder width
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    f"mmil-{g}-m{m:g}": (
        "mmil",
        f"MMIL-Transformer, {g.replace('_', '-')} grouping, masking {m:g}",
        {
            "embed_dim": WIDTH,
            "num_subbags": 10,
            "num_msg": 1,
            "num_layers": 2,
            "grouping": g,
            "mask_ratio": m,
        },
    )  # fmt: skip
    for g in ("random", "sequential", "kmeans_coords")
    for m in (0.0, 0.6)
}
ROWS.update({
    "abmil": ("abmil", "ABMIL", {"feat_ext_dim": WIDTH}),
    "transmil": ("transmil", "TransMIL", {"feat_ext_dim": WIDTH, "att_dim": WIDTH}),
    "dsmil": ("dsmil", "DSMIL", {"feat_ext_dim": WIDTH}),
    "clam_sb": ("clam_sb", "CLAM-SB", {"feat_ext_dim": WIDTH}),
    "dtfdmil": ("dtfdmil", "DTFD-MIL", {"feat_ext_dim": WIDTH}),
})  # fmt: skip

#: Everything below this line of the table is hand-written analysis, kept on a rewrite.
FINDINGS = "<!-- findings: hand-written, kept when the tables above are regenerated -->"
FULL = {"size": "cpu", "n_train": 270, "n_test": 130, "max_epochs": 50}
REDUCED = {"size": "small", "n_train": 60, "n_test": 30, "max_epochs": 10}
RECIPE = {"weight_decay": 1e-5, "batch_size": 1, "accumulate_grad_batches": 1,
          "val_fraction": 0.1, "early_stopping": True, "patience": 20, "stop_start_epoch": 50,
          "num_test": 1, "progress": False}  # fmt: skip


# --------------------------------------------------------------------------- one run (child)
def _oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate" in text


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train, test and measure one (row, rate, seed) in this process."""
    import lightning.pytorch as L
    import torch

    from sparsemil import config as config_system
    from sparsemil.errors import SparsemilError
    from sparsemil.train.config import MILTrainConfig
    from sparsemil.train.data import holdout_for, load_mil_data
    from sparsemil.train.inference import attention_auc, load_predictor
    from sparsemil.train.trainer import fit_fold, preflight

    torch.set_num_threads(int(spec["threads"]))
    cuda = spec["accelerator"] == "gpu"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class EpochTimer(L.Callback):
        """Wall seconds of each training epoch (up to validation)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t: float | None = None

        def on_train_epoch_start(self, trainer, module) -> None:
            sync()
            self._t = time.perf_counter()

        def _stop(self) -> None:
            if self._t is not None:
                sync()
                self.seconds.append(time.perf_counter() - self._t)
                self._t = None

        def on_validation_epoch_start(self, trainer, module) -> None:
            self._stop()

        def on_train_epoch_end(self, trainer, module) -> None:
            self._stop()

    run_dir = Path(spec["run_dir"])
    cfg = config_system.from_mapping(MILTrainConfig, {
        **RECIPE, "data": spec["data"], "format": "split", "model": spec["model"],
        "model_kwargs": spec["model_kwargs"], "max_epochs": spec["max_epochs"],
        "lr": spec["lr"], "seed": spec["seed"], "accelerator": spec["accelerator"],
        "out": str(run_dir),
    }, "slide_scale")  # fmt: skip
    data = load_mil_data(cfg)
    split = holdout_for(data, cfg)
    preflight(cfg, data)
    timer = EpochTimer()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, Any] = {"row": spec["row"], "rate": spec["rate"], "seed": spec["seed"]}
    t0 = time.perf_counter()
    try:
        result = fit_fold(cfg, data, split, run_dir, extra_callbacks=[timer])
    except Exception as err:  # noqa: BLE001 - report out-of-memory in the row
        if not _oom(err):
            raise
        out["error"] = "out of memory: " + " ".join(str(err).split())[:160]
        result = None
    out["train_seconds"] = time.perf_counter() - t0
    if not cuda:  # training's peak (ru_maxrss: KiB on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        unit = 2**30 if sys.platform == "darwin" else 2**20
        out["peak_gib"], out["before_fit_gib"] = rss / unit, rss0 / unit
        out["memory"] = "peak RSS of the run's process"
    out["epoch_seconds"] = float(np.mean(timer.seconds)) if timer.seconds else None
    out["epochs"] = len(timer.seconds)
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["memory"] = "peak allocated CUDA memory"
    if result is not None:
        out["accuracy"] = result["metrics"]["accuracy"]
        out["auc"] = result["metrics"]["auc"]
        out["predictions"] = [[p["slide_id"], int(p["label"]), float(p["prob_1"])]
                              for p in result["predictions"]]  # fmt: skip
        predictor = load_predictor(run_dir / "model.safetensors", "cuda" if cuda else "cpu")
        try:
            loc = attention_auc(predictor, data.bags, split.test.tolist())
            out["loc_auc"], out["loc_bags"] = loc["mean"], loc["n_bags"]
            out["loc_per_bag"] = loc["per_bag"]
        except (SparsemilError, TypeError) as err:  # DTFD-MIL's forward takes no return_att
            out["loc_note"] = f"no attention ({type(err).__name__}: {err})"
    return out


# --------------------------------------------------------------------------- the driver
def cohort(args: argparse.Namespace, root: Path) -> dict[float, Path]:
    """Write (or reuse) the cohort of every rate; ``{rate: folder}``."""
    from sparsemil.data.synth import SynthConfig, synth_cohort

    cfg = SynthConfig(out=str(root), seed=args.cohort_seed, size=args.size,
                      witness_rate=args.rates, n_train=args.n_train, n_test=args.n_test,
                      images=args.images, images_path=args.images_path)  # fmt: skip
    dirs = dict(zip(args.rates, cfg.cohort_dirs(), strict=True))
    want = {k: v for k, v in vars(cfg).items() if k not in ("out", "overwrite")}
    have = []
    for d in dirs.values():
        try:
            have.append(json.loads((d / "cohort.json").read_text())["options"])
        except (OSError, ValueError, KeyError):
            have.append(None)
    if all(h == want for h in have):
        return dirs
    print(f"writing the cohort to {root} ...", flush=True)
    res = synth_cohort(SynthConfig(**{**vars(cfg), "overwrite": True}), progress=True)
    print(f"cohort: {res.n_bags} slides, {res.n_instances} instances, "
          f"{res.seconds['total']:.0f} s", flush=True)  # fmt: skip
    return dirs


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fmt(values: list[float], digits: int = 3) -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}"


def hardware(args: argparse.Namespace) -> str:
    if args.accelerator == "gpu":
        import torch

        return f"1 GPU ({torch.cuda.get_device_name(0)})"
    return f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s)"


def write_table(args: argparse.Namespace, dirs: dict[float, Path], results: list[dict]) -> None:
    from sparsemil.io import atomic_write_text

    m = json.loads((next(iter(dirs.values())) / "cohort.json").read_text())
    inst = m["summary"]["instances"]
    lines = [
        "# Slide-scale synthetic MIL benchmark",
        "",
        f"Regenerate: `python benchmarks/slide_scale.py {' '.join(args.argv)}`".rstrip() + ".",
        "",
    ]
    if args.reduced:
        lines += [
            f"**Reduced run (CPU-feasible):** preset `{args.size}` slides, {args.n_train} "
            f"training / {args.n_test} test slides, {args.max_epochs} epochs -- not the "
            "slide-scale protocol (preset `cpu`, 270 / 130 slides, 50 epochs); numbers are "
            "for checking the pipeline, not for comparing models at scale.",
            "",
        ]
    lines += [
        f"- **Cohort** (`sparsemil mil synth`, seed {args.cohort_seed}): {m['images']['dataset']}"
        f" images, tumour class `{m['images']['tumour_class']}` among "
        f"{len(m['images']['normal_classes'])} normal classes; encoder {m['encoder']['kind']} "
        f"{m['encoder']['dim']}-d; **instance linear-probe AUC {m['linear_probe']['auc']:.3f}**"
        f"; {m['summary']['n_train']} training / {m['summary']['n_test']} test slides, "
        f"{m['summary']['n_positive']} positive; instances per slide median "
        f"{inst['median']:.0f}, max {inst['max']} (preset `{args.size}`).",
        f"- **Recipe** (every row): AdamW lr {args.lr:g}, weight decay "
        f"{RECIPE['weight_decay']:g}, cosine schedule, {args.max_epochs} epochs, bag batch 1, "
        f"10 % of the training slides held out for validation, best validation-loss epoch; "
        f"MMIL {WIDTH}-d, 10 sub-bags, 2 layers, 1 message token; baselines with a "
        f"{WIDTH}-d `Linear -> ReLU` instance encoder (`feat_ext_dim`).",
        f"- **Seeds** {','.join(str(s) for s in args.seeds)} (training; the cohort is fixed): "
        "mean ± std (population) over seeds. Bag metrics on the test slides; localisation = "
        "per positive test slide, ROC AUC of the attention against the instance labels, "
        "averaged over slides.",
        f"- **Time and memory** measured in the same run, {hardware(args)}: seconds per "
        "training epoch (validation excluded), peak memory (peak RSS of the run's process on "
        "CPU, peak allocated CUDA memory on a GPU; maximum over seeds)"
        + (
            f"; on CPU the process held {max(base):.2f} GiB (libraries, data index) before "
            "training started."
            if (base := [r["before_fit_gib"] for r in results if "before_fit_gib" in r])
            else "."
        ),
        "",
    ]
    for rate in args.rates:
        lines += [
            f"## Witness rate {rate * 100:g} %",
            "",
            "| model | seeds | bag accuracy | bag AUC | localisation AUC | best epoch | s / epoch "
            "| peak GiB | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key in args.models:
            rs = [r for r in results if r["row"] == key and r["rate"] == rate]
            if not rs:
                continue
            notes = sorted({r["error"] for r in rs if "error" in r})
            notes = [f"cannot hold the cohort's largest bag ({inst['max']} instances): {n}"
                     for n in notes]  # fmt: skip
            if any("loc_note" in r for r in rs):
                notes.append("no attention scores to localise with")
            peak = [r["peak_gib"] for r in rs if r.get("peak_gib") is not None]
            lines.append(
                f"| {ROWS[key][1]} | {len(rs)} | {fmt([r.get('accuracy') for r in rs])} | "
                f"{fmt([r.get('auc') for r in rs])} | {fmt([r.get('loc_auc') for r in rs])} | "
                f"{', '.join(str(best_epoch(r)) for r in rs)} of {args.max_epochs} | "
                f"{fmt([r.get('epoch_seconds') for r in rs], 2)} | "
                f"{f'{max(peak):.2f}' if peak else '–'} | {'; '.join(notes)} |"
            )
        lines.append("")
        lines += size_breakdown(args, dirs[rate], [r for r in results if r["rate"] == rate])
    old = Path(args.table).read_text() if Path(args.table).is_file() else ""
    if FINDINGS in old:  # the hand-written analysis below the marker survives a rewrite
        lines.append(old[old.index(FINDINGS) :].rstrip("\n"))
    atomic_write_text(args.table, "\n".join(lines) + "\n")


def best_epoch(r: dict) -> int | str:
    """The epoch (1-based) whose checkpoint was tested (lowest validation loss)."""
    try:
        res = json.loads((Path(r["spec"]["run_dir"]) / "result.json").read_text())
        return int(res["best_epoch"]) + 1
    except (OSError, ValueError, KeyError):
        return "?"


def size_breakdown(args: argparse.Namespace, cohort_dir: Path, results: list[dict]) -> list[str]:
    """Bag AUC and localisation AUC of every row on the smaller and the larger half of the
    test slides (split at the median instance count), pooled over seeds."""
    from sklearn.metrics import roc_auc_score

    slides = json.loads((cohort_dir / "cohort.json").read_text())["slides"]
    size = {s["slide_id"]: s["n_instances"] for s in slides if s["part"] == "test"}
    cut = float(np.median(list(size.values())))
    halves = {"small": lambda n: n <= cut, "large": lambda n: n > cut}
    counts = {h: sum(f(n) for n in size.values()) for h, f in halves.items()}
    lines = [
        f"By bag size (test slides split at the median, {cut:.0f} instances: {counts['small']} "
        f"small, {counts['large']} large; bag AUC of the predictions pooled over seeds, "
        "localisation AUC averaged over the positive slides of each half and the seeds):",
        "",
        "| model | bag AUC, small | bag AUC, large | localisation, small | localisation, large |",
        "|---|---|---|---|---|",
    ]
    for key in args.models:
        rs = [r for r in results if r["row"] == key and r.get("predictions")]
        if not rs:
            continue
        cells = []
        for f in halves.values():
            y = [lab for r in rs for sid, lab, _ in r["predictions"] if f(size[sid])]
            p = [pr for r in rs for sid, _, pr in r["predictions"] if f(size[sid])]
            cells.append(f"{roc_auc_score(y, p):.3f}" if len(set(y)) == 2 else "–")
        for f in halves.values():
            v = [a for r in rs for sid, a in (r.get("loc_per_bag") or {}).items() if f(size[sid])]
            cells.append(f"{np.mean(v):.3f} ({len(v)})" if v else "–")
        lines.append(f"| {ROWS[key][1]} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--reduced", action="store_true", help="CPU-feasible run (stated in the table).")
    p.add_argument("--out", type=Path, default=Path("runs/slide-scale"))
    p.add_argument("--table", type=Path, default=Path("docs/results/slide_scale.md"))
    p.add_argument("--rates", default="0.002,0.01,0.05", help="Witness rates.")
    p.add_argument("--seeds", default="0,1,2", help="Training seeds.")
    p.add_argument("--models", default=",".join(ROWS), help=f"Rows: {', '.join(ROWS)}.")
    p.add_argument("--size", choices=("small", "medium", "cpu", "large"))
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--images", default="fashion-mnist")
    p.add_argument("--images-path")
    p.add_argument("--cohort-seed", type=int, default=0)
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    if args.one:
        spec = json.loads(Path(args.one).read_text())
        res = {**run_one(spec), "spec": spec}
        Path(spec["run_dir"], "bench.json").write_text(json.dumps(res, indent=2))
        return 0
    from sparsemil.data.synth import parse_rates

    args.argv = [a for a in raw if a != "--one"]
    preset = REDUCED if args.reduced else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.rates = parse_rates(args.rates)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    dirs = cohort(args, args.out / "cohort")
    results = []
    for rate in args.rates:
        for key in args.models:
            for seed in args.seeds:
                run_dir = args.out / "runs" / f"w{rate:g}" / key / f"seed_{seed}"
                done = run_dir / "bench.json"
                model, _, kwargs = ROWS[key]
                spec = {"row": key, "rate": rate, "seed": seed, "model": model,
                        "model_kwargs": kwargs, "data": str(dirs[rate] / "split.csv"),
                        "cohort_sha256": sha256(dirs[rate] / "cohort.json"),
                        "max_epochs": args.max_epochs, "lr": args.lr,
                        "accelerator": args.accelerator, "threads": args.threads,
                        "run_dir": str(run_dir)}  # fmt: skip
                if not done.is_file() or json.loads(done.read_text()).get("spec") != spec:
                    if run_dir.exists():
                        shutil.rmtree(run_dir)  # a run of another cohort or recipe
                    run_dir.mkdir(parents=True)
                    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
                    print(f"w={rate:g} {key} seed {seed} ...", flush=True)
                    with open(run_dir / "log.txt", "w") as log:
                        rc = subprocess.call(
                            [sys.executable, __file__, "--one", str(run_dir / "spec.json")],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    if rc != 0 or not done.is_file():
                        print(f"  failed (exit {rc}); see {run_dir / 'log.txt'}", flush=True)
                        continue
                results.append(json.loads(done.read_text()))
                write_table(args, dirs, results)
    print(f"table: {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
