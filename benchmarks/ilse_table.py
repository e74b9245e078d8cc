"""Regenerate docs/results/mil_ilse.md: Ilse et al.'s (2018) attention and gated-attention
MIL (their embedding network and protocol) and MMIL-Transformer under the same protocol, on
Musk1, Musk2, Fox, Tiger and Elephant.

    python benchmarks/ilse_table.py                       # the table (5 x 10-fold CV; MMIL 1 rep)
    python benchmarks/ilse_table.py --datasets musk1 --reps 1 --out /tmp/ilse \\
        --table /tmp/mil_ilse.md                          # one dataset, one repetition

Resumable: one result file per (dataset, model, repetition) under ``--out``; the table is
rewritten after each. One torch thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sparsemil.data.mil_benchmarks import CLASSIC_BENCHMARKS
from sparsemil.errors import SparsemilError
from sparsemil.experiments.ilse_benchmark import (
    DEFAULT_REPS,
    ENTRIES,
    Protocol,
    collect,
    run_ilse_benchmark,
    write_ilse_table,
)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(CLASSIC_BENCHMARKS))
    p.add_argument("--models", default=",".join(ENTRIES))
    p.add_argument("--reps", type=int, default=5, help="CV repetitions (Ilse et al.: 5)")
    p.add_argument(
        "--mmil-reps", type=int, default=DEFAULT_REPS["mmil"], help="repetitions of mmil"
    )
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--max-epochs", type=int, default=Protocol.max_epochs)
    p.add_argument("--patience", type=int, default=Protocol.patience)
    p.add_argument("--val-fraction", type=float, default=Protocol.val_fraction)
    p.add_argument("--out", default="runs/ilse")
    p.add_argument("--table", default="docs/results/mil_ilse.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--report-only", action="store_true",
        help="rewrite --table from the results under --out; train nothing",
    )  # fmt: skip
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    protocol = Protocol(
        repetitions=a.reps, folds=a.folds, max_epochs=a.max_epochs, patience=a.patience,
        val_fraction=a.val_fraction,
    )  # fmt: skip
    bad = [f"--{k.replace('_', '-')} must be >= {lo}" for k, lo in
           (("reps", 1), ("folds", 2), ("max_epochs", 1), ("patience", 1), ("mmil_reps", 1))
           if getattr(a, k) < lo]  # fmt: skip
    if not 0 < a.val_fraction < 1:
        bad.append("--val-fraction must be in (0, 1)")
    if not _names(a.datasets) or not _names(a.models):
        bad.append("--datasets and --models need at least one name each")
    if bad:
        print(f"error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    t0 = time.time()
    if a.report_only:
        rows = collect(a.out)
        if not rows:
            print(f"error: --out {a.out}: no results to tabulate", file=sys.stderr)
            return 2
        found = {json.dumps(r["protocol"], sort_keys=True) for r in rows}
        if len(found) != 1:
            print(f"error: --out {a.out} mixes protocols {sorted(found)}; tabulate one "
                  "protocol per folder", file=sys.stderr)  # fmt: skip
            return 2
        # the protocol the results were run with, not the command-line defaults
        protocol = Protocol(repetitions=a.reps, **json.loads(found.pop()))
        write_ilse_table(a.table, rows, protocol)
        print(f"[ilse] table: {a.table}")
        return 0
    try:
        run_ilse_benchmark(
            _names(a.datasets), _names(a.models), a.out, a.table, protocol,
            reps={"mmil": a.mmil_reps},
        )  # fmt: skip
    except SparsemilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[ilse] done in {time.time() - t0:.0f}s; table: {a.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
