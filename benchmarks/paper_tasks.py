"""The pruning paper's tasks on the data we have offline; regenerates docs/results/paper_tasks.md.

    python benchmarks/paper_tasks.py --budget cpu [--rows fc5,fc12,...] [--out DIR]
    python benchmarks/paper_tasks.py --budget full --device cuda      # official 200 epochs
    python benchmarks/paper_tasks.py --report-only --out DIR          # markdown from results

The paper (Zhang, Zhang, Sun & Liu, NeurIPS 2024, arXiv 2306.05857) runs FC5, FC12, AlexNet and
VGG16 on CIFAR-10 and ResNet18/50 on CIFAR-100 and TinyImageNet. CIFAR is not reachable
offline, so every row runs on **Fashion-MNIST** (Debian ``dataset-fashion-mnist``, 60k / 10k):
the FC nets take the 784-d images (the official FC nets take 3x32x32 = 3072-d CIFAR input);
the CNNs take the images padded with black to 32x32 and the grey channel replicated to 3
(``image_size: 32``, ``channels: 3``), so the CIFAR-layout networks run unchanged.

Each row is the official config (``configs/*_l1.yml`` of QiaozheZhang/Global-One-shot-Pruning)
with ``scheduler_step: iteration`` (official), ``augment: official`` for the 32x32 CNNs and the
important-eigenvalue counter-measure on for the CNNs (as the official code does), except where
the budget forces a reduction: ``--budget cpu`` reduces epochs, training/test set sizes, the
Hessian's samples, the ratio grid and the Lanczos steps **per row, stated in the table**;
``--budget full`` runs the official settings (a GPU run). Every row also has ``lanczos_num: 4``
(official 1) so the prediction comes with its spread over probes.

Each row runs in its own process (``run_limit``) and writes ``<out>/<row>/limit.json``; a row
whose ``limit.json`` exists is reused, so an interrupted run resumes. The markdown is rewritten
after every finished row. The paper's own per-task figures could not be retrieved offline;
the column says so rather than quoting numbers we could not check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sparsemil.limit.predict import actual_censoring

REPO = Path(__file__).resolve().parents[1]
#: Everything below this line of the doc is hand-written analysis, kept on a rewrite.
FINDINGS = "<!-- findings: hand-written, kept when the table above is regenerated -->"
DOC = REPO / "docs" / "results" / "paper_tasks.md"

_FC = dict(
    dataset="fashion-mnist", batch_size=128, optim="sgd", lr=0.01, momentum=0.9,
    weight_decay=0.0, schedu=False, warm=0, epoch=200, l1=True, lmbda=5e-5,
    sparse_epoch=1000, lanczos_iter=128,
)  # fmt: skip
_CNN = dict(
    dataset="fashion-mnist", image_size=32, channels=3, augment="official",
    scheduler_step="iteration", batch_size=128, optim="sgd", momentum=0.9, weight_decay=0.0,
    warm=5, epoch=200, l1=True, sparse_epoch=1000, lanczos_iter=128,
)  # fmt: skip

# row -> (official config on Fashion-MNIST, the paper's data for this network)
OFFICIAL: dict[str, tuple[dict, str]] = {
    "fc5": ({**_FC, "model": "fc", "gamma": 0.2}, "CIFAR-10"),
    "fc12": ({**_FC, "model": "fc12", "gamma": 0.5}, "CIFAR-10"),
    "alexnet": (
        {**_CNN, "model": "alexnet", "lr": 0.01, "lmbda": 3e-5, "schedu": True,
         "schedumode": "multistep", "milestones": [60, 120, 160], "gamma": 0.5,
         "lanczos_iter": 96},
        "CIFAR-10",
    ),
    "vgg16": (
        {**_CNN, "model": "vgg16", "lr": 0.01, "lmbda": 1e-4, "schedu": False,
         "milestones": [60, 120, 160], "gamma": 0.5},
        "CIFAR-10",
    ),
    "resnet18": (
        {**_CNN, "model": "resnet18", "lr": 0.1, "lmbda": 5e-5, "schedu": True,
         "schedumode": "cos", "milestones": [60, 120, 160], "gamma": 0.2},
        "CIFAR-100, TinyImageNet",
    ),
    "resnet50": (
        {**_CNN, "model": "resnet50", "lr": 0.1, "lmbda": 2e-5, "schedu": True,
         "schedumode": "cos", "milestones": [60], "gamma": 0.2},
        "CIFAR-100, TinyImageNet",
    ),
}  # fmt: skip
CNNS = ("alexnet", "vgg16", "resnet18", "resnet50")

# --budget cpu: what 2 CPU cores allow in a few hours in all (stated in every row)
CPU_REDUCTION: dict[str, dict] = {
    "fc5": dict(limit=dict(hessian_samples=5000), sparse_epoch=200, lanczos_iter=64),
    "fc12": dict(epoch=20, sparse_epoch=30, lanczos_iter=32, limit=dict(hessian_samples=1000)),
    "alexnet": dict(epoch=1, subset=600, test_subset=300, sparse_epoch=10, lanczos_iter=8,
                    limit=dict(hessian_samples=64, important_ratios=5, hvp_method="autograd")),
    "vgg16": dict(epoch=2, subset=1500, test_subset=300, sparse_epoch=16, lanczos_iter=12,
                  limit=dict(hessian_samples=150, important_ratios=10)),
    "resnet18": dict(epoch=2, subset=1000, test_subset=300, sparse_epoch=16, lanczos_iter=8,
                     limit=dict(hessian_samples=150, important_ratios=10)),
    "resnet50": dict(epoch=1, subset=600, test_subset=300, sparse_epoch=10, lanczos_iter=8,
                     limit=dict(hessian_samples=64, important_ratios=5, hvp_method="autograd")),
}  # fmt: skip


def row_config(row: str, budget: str, device: str) -> dict:
    """The config of ``row``: official, then the budget's reductions (a nested ``limit``
    section is merged key by key)."""
    cfg, _ = OFFICIAL[row]
    cfg = {**cfg, "lanczos_num": 4, "seed": 0, "device": device, "eval_batch_size": 1000}
    limit = {"important": row in CNNS, "hessian_batch_size": 500}
    if budget == "cpu":
        red = dict(CPU_REDUCTION[row])
        limit.update(red.pop("limit", {}))
        cfg.update(red)
    cfg["limit"] = limit
    return cfg


def reductions(row: str, ran: dict | None = None) -> str:
    """The departures of the config a row ran with (``ran``, its ``config.json``; default:
    today's ``--budget cpu`` config) from the official one, in words (for the table)."""
    official = row_config(row, "full", "cpu")
    ran = row_config(row, "cpu", "cpu") if ran is None else ran
    parts = []
    for key, val in ran.items():
        if key == "limit":
            parts += [f"{k}={v}" for k, v in val.items() if official["limit"].get(k) != v]
        elif key != "device" and official.get(key) != val:
            parts.append(f"{key} {official.get(key, 'all')}->{val}")
    return ", ".join(parts) or "none (official settings)"


def run_row(row: str, budget: str, device: str, out: Path) -> Path:
    """One ``run_limit`` in a child process (resumable: an existing limit.json is kept)."""
    row_dir = out / row
    cfg = row_config(row, budget, device)
    if (row_dir / "limit.json").is_file():
        ran = json.loads((row_dir / "config.json").read_text())
        if ran != json.loads(json.dumps(cfg)):
            sys.exit(
                f"paper_tasks: {row_dir} was run with another config than --budget {budget} "
                f"gives now ({reductions(row, ran)}); fix: use another --out, or delete the row"
            )
        return row_dir
    if (row_dir / "model.safetensors").is_file():  # trained earlier: resume the limit step
        ran = json.loads((row_dir / "config.json").read_text())
        want = json.loads(json.dumps(cfg))
        if {k: v for k, v in ran.items() if k != "limit"} != {
            k: v for k, v in want.items() if k != "limit"
        }:  # the limit section may change: only the limit step is rerun
            sys.exit(f"paper_tasks: {row_dir} holds a model trained with another config; fix: "
                     "use another --out, or delete the row")  # fmt: skip
    row_dir.mkdir(parents=True, exist_ok=True)
    (row_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    code = (
        "import json, sys, time; from pathlib import Path\n"
        "from sparsemil.experiments.vision.config import config_from_dict\n"
        "from sparsemil.experiments.vision.run import resume_limit, run_limit\n"
        "d = Path(sys.argv[1]); t0 = time.time()\n"
        "cfg = config_from_dict(json.loads((d / 'config.json').read_text()), where='paper row')\n"
        "if (d / 'model.safetensors').is_file() and (d / 'history.json').is_file():\n"
        "    doc = resume_limit(cfg, d, progress=False, log=print)  # trained; limit step died\n"
        "else:\n"
        "    doc = run_limit(cfg, d, progress=False, log=print)\n"
        "w = d / 'wall.json'; resumed = 'resumed' in doc\n"
        "train = json.loads((d / 'history.json').read_text()).get('seconds', 0) if resumed else 0\n"
        "w.write_text(json.dumps({'wall_s': train + time.time() - t0, 'resumed': resumed}))\n"
    )
    with open(row_dir / "log.txt", "a") as log:
        subprocess.run(
            [sys.executable, "-c", code, str(row_dir)], stdout=log, stderr=subprocess.STDOUT,
            check=False,
        )  # fmt: skip
    return row_dir


def _f(v, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _cell(v, nd: int = 3) -> str:
    return v if isinstance(v, str) else _f(v, nd)


def row_line(row: str, doc: dict, ran: dict | None, wall: float | None) -> str:
    """One markdown row of the paper-task table."""
    act = doc["actual_ratio"]
    pred = doc["predicted_ratio"]
    spread = doc.get("uncertainty") or {}
    iv = spread.get("interval_90") or [None, None]
    prem = doc.get("premises") or {}
    kkt = prem.get("kkt") or {}
    order = prem.get("order") or {}
    aniso = prem.get("anisotropy") or {}
    b = doc.get("bounds") or {}
    errs = dict(doc.get("abs_error_by_criterion") or {})
    kept = dict(doc.get("kept_fraction_rel_error") or {})
    # a limit at the largest swept ratio is only known to be >= it: shown as such, and its
    # errors as censored, never scored (limit.predict.actual_censoring)
    n_ratios = int((ran or {}).get("sparse_epoch") or 0)
    shown = {c: _f(act.get(c)) for c in ("official", "drop_1pt")}
    if n_ratios > 0:
        rho_max = (n_ratios - 1) / n_ratios
        for c in shown:
            why = actual_censoring(act.get(c), rho_max)
            if why == "actual at rho_max":
                shown[c] = f">= {_f(act.get(c))} (censored)"
            if pred is None or pred >= rho_max - 1e-9:  # beyond the sweep, or at its top
                why = why or "prediction censored"
            if why:
                errs[c] = kept[c] = "undefined" if why == "actual undefined" else "censored"
    # the limit step's own verdict: a dense model at chance has no limit worth predicting
    at_chance = any(w.startswith("chance-level") for w in doc.get("warnings") or [])
    chance = " (chance: not meaningful)" if at_chance else ""
    _, paper_data = OFFICIAL[row]
    return (
        f"| {row} | Fashion-MNIST ({paper_data} in the paper) | {doc['D']:,} "
        f"| {doc.get('epoch')} | {_f(doc['dense'].get('test_acc'))}{chance} "
        f"| {_f(pred)} [{_f(iv[0])}, {_f(iv[1])}] | [{_f(b.get('lower'))}, {_f(b.get('upper'))}] "
        f"| {shown['official']} | {shown['drop_1pt']} "
        f"| {_cell(errs.get('official'))} / {_cell(errs.get('drop_1pt'))} "
        f"| {_cell(kept.get('official'), 2)} / {_cell(kept.get('drop_1pt'), 2)} "
        f"| {_f(kkt.get('residual'), 3)} vs {_f(kkt.get('bound'), 3)} "
        f"| {_f(order.get('first_order_share'), 2)} | {_f(aniso.get('ratio'), 2)} "
        f"| {'–' if wall is None else f'{wall / 60:.0f} min'} "
        f"| {reductions(row, ran)} | not retrieved |"
    )


def write_markdown(out: Path, rows: list[str], budget: str, doc_path: Path = DOC) -> None:
    lines = [
        "# The pruning paper's tasks, on Fashion-MNIST",
        "",
        f"Generated by `python benchmarks/paper_tasks.py --budget {budget}` from the results in "
        f"`{out}`. See the script's docstring for the protocol.",
        "",
        "- **Data:** Fashion-MNIST stands in for CIFAR-10/100 and TinyImageNet in every row "
        "(not reachable offline). FC nets: 784-d input (the official FC nets take 3072-d CIFAR "
        "input). CNNs: images padded with black to 32x32, grey replicated to 3 channels.",
        "- **Config:** official `configs/*_l1.yml` values (lambda, lr, warm-up, schedule stepped "
        "per iteration, batch 128, kaiming-normal init); `augment: official` and the "
        "important-eigenvalue counter-measure for the CNNs; 4 SLQ probes (official 1).",
        "- **Reduced rows:** the `reduction` column lists every departure from the official "
        "config forced by the CPU budget (`--budget full` runs none of them).",
        "- **Columns:** predicted rho with its 90 % interval over probes; the trace bracket "
        "[Jensen lower = trace-only predictor, chord upper]; actual rho under the official "
        "criterion (largest ratio whose test accuracy stays strictly above the dense one) and "
        "under `drop_1pt`; |error| in rho (official / drop_1pt); relative error in the kept "
        "fraction 1 - rho (official / drop_1pt); the premise checks: KKT residual vs "
        "lambda sqrt(D), first-order share of the loss change at the predicted ratio, "
        "anisotropy (Rayleigh quotient of the pruning direction over Tr(H)/D).",
        "- **Paper's figures:** the per-task numbers of the paper could not be retrieved from "
        "a public source here, so none are quoted.",
        "",
        "| network | data | D | epochs | dense acc | predicted [90%] | trace bracket "
        "| actual (official) | actual (drop_1pt) | abs err | kept-fraction err "
        "| KKT residual vs lambda sqrt(D) | first-order share | anisotropy | wall "
        "| reduction | paper |",
        "|" + " --- |" * 17,
        *rows,
        "",
    ]
    old = doc_path.read_text() if doc_path.is_file() else ""
    if FINDINGS in old:  # the hand-written analysis below the marker survives a rewrite
        lines += [old[old.index(FINDINGS) :].rstrip("\n"), ""]
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc_path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(doc_path)


def collect(out: Path, order: list[str], budget: str) -> list[str]:
    rows = []
    for row in order:
        f = out / row / "limit.json"
        if not f.is_file():
            hist_f = out / row / "history.json"
            if hist_f.is_file():  # trained, but the limit step did not finish
                acc = json.loads(hist_f.read_text())["test_acc"][-1]
                rows.append(f"| {row} | trained (dense test acc {acc:.3f}); the limit step did "
                            "not finish (see the row's log.txt; rerun to resume) |" + " |" * 15)  # fmt: skip
            else:
                rows.append(f"| {row} | (not run yet) |" + " |" * 15)
            continue
        doc = json.loads(f.read_text())
        wall_f = out / row / "wall.json"
        wall = json.loads(wall_f.read_text())["wall_s"] if wall_f.is_file() else None
        cfg_f = out / row / "config.json"
        ran = json.loads(cfg_f.read_text()) if cfg_f.is_file() else row_config(row, budget, "cpu")
        rows.append(row_line(row, doc, ran, wall))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", choices=("cpu", "full"), default="cpu")
    ap.add_argument("--rows", default=",".join(OFFICIAL))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO.parent / "runs" / "paper_tasks"))
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    order = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in order if r not in OFFICIAL]
    if unknown or not order:
        print(f"paper_tasks: --rows: unknown rows {unknown or '(none given)'}; choose from "
              f"{', '.join(OFFICIAL)}", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    out = Path(args.out)
    if args.report_only and not any((out / r / "limit.json").is_file() for r in order):
        print(f"paper_tasks: --out {out} holds no finished rows ({', '.join(order)}); nothing "
              "to tabulate, the doc is left as it is", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    if not args.report_only:
        for row in order:
            t0 = time.time()
            run_row(row, args.budget, args.device, out)
            print(f"{row}: {time.time() - t0:.0f}s", flush=True)
            write_markdown(out, collect(out, order, args.budget), args.budget, Path(args.doc))
    write_markdown(out, collect(out, order, args.budget), args.budget, Path(args.doc))


if __name__ == "__main__":
    main()
