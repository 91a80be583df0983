"""Write a synthetic click log in the Avazu CTR format (adrec.data.avazu_like; not Avazu data).

    python benchmarks/make_avazu_like.py --rows 20000 --out /tmp/avazu.csv [--seed 0] [--days 10]

Prints JSON: the file, its rows, CTR, and the AUC of the planted click probability (the ceiling
any model can reach on it). Train on it with `python jobs/pipeline.py experiment=avazu data.path=/tmp/avazu.csv`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adrec.data.avazu_like import make_log, write_csv
from adrec.eval.metrics import auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=10, help="the hour column spans this many days from 2014-10-21")
    args = parser.parse_args()
    table, probability = make_log(args.rows, args.seed, args.days)
    write_csv(table, args.out)
    clicks = table["click"].to_numpy()
    print(
        json.dumps(
            {"out": str(args.out), "rows": table.num_rows, "ctr": round(float(clicks.mean()), 4), "planted_auc": round(auc(clicks, probability), 4)}
        )
    )


if __name__ == "__main__":
    main()
