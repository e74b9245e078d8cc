"""Regenerate docs/results/mil_benchmarks.md (same as ``sparsemil mil benchmark``).

    python benchmarks/mil_table.py --seeds 0,1,2 --folds 10
    python benchmarks/mil_table.py --models mmil,abmil --datasets musk1 --folds 2 --max-epochs 3 \
        --out /tmp/bench --table /tmp/table.md     # a quick check

Finished (dataset, model, seed) runs under ``--out`` are reused; the table is rewritten after
every finished run and states the protocol of each row.
"""

from __future__ import annotations

import sys

from sparsemil.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["mil", "benchmark", *sys.argv[1:]]))
