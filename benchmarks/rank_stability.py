"""Do the fine-tuning ranks of two runs of the same studies contradict each other (issue 29)?

Run the fine-tuning studies twice into two output roots, once on a quiet machine and once beside
a busy loop, then compare their leaderboards technique by technique:

    S=".venv/bin/python -m effllm_helpers.cli sweep -p tiny --no-progress"
    $S -o /tmp/quiet params/finetuning/{general,domain,qlora}.yaml
    $S -o /tmp/quiet params/finetuning/general.yaml --seeds 0,1,2 --only method=lora,dora,full
    python3 -c "while True: pass" &   # then the same two sweeps with -o /tmp/busy; kill %1
    python benchmarks/rank_stability.py /tmp/quiet /tmp/busy

Per study it prints how many techniques' point-score ranks moved (the score alone), how many
tied ranks moved (the leaderboard's, where intervals overlap) and the contradicting pairs: two
techniques one run orders A before B and the other B before A. The goal is none.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effllm_helpers import results as R  # noqa: E402
from effllm_helpers.report import leaderboard as L  # noqa: E402

STUDIES = ("finetuning_general", "finetuning_domain", "finetuning_qlora")


def board(root: Path) -> pd.DataFrame:
    """The ok fine-tuning rows of the leaderboard of ``root``'s records."""
    found = [root / "runs" / s for s in STUDIES if (root / "runs" / s).is_dir()]
    if not found:
        raise SystemExit(f"{root}: no runs/{{{','.join(STUDIES)}}} folder (an output root of "
                         "the fine-tuning sweeps, e.g. outputs)")
    tidy = pd.concat([R.collect(f) for f in found])
    b = L.leaderboard_frame(tidy)
    return b[(b["axis"] == "finetuning") & (b["status"] == "ok")]


def compare(a: pd.DataFrame, b: pd.DataFrame) -> list[dict[str, object]]:
    """One row per study: techniques, moved point ranks, moved tied ranks, contradictions."""
    out = []
    for study in sorted(set(a["study"]) & set(b["study"])):
        per = [x[x["study"] == study].groupby("technique").agg(rank=("rank", "min"),
                                                               score=("score", "mean"))
               for x in (a, b)]
        j = per[0].join(per[1], how="inner", lsuffix="_a", rsuffix="_b")
        point = [j[f"score_{s}"].rank(ascending=False, method="min") for s in "ab"]
        contra = [(t, u) for t, u in itertools.combinations(j.index, 2)
                  if (j.at[t, "rank_a"] - j.at[u, "rank_a"])
                  * (j.at[t, "rank_b"] - j.at[u, "rank_b"]) < 0]
        out.append({"study": study, "techniques": len(j),
                    "point_ranks_moved": int((point[0] != point[1]).sum()),
                    "tied_ranks_moved": int((j["rank_a"] != j["rank_b"]).sum()),
                    "contradictions": contra, "table": j})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("first", type=Path, help="output root of the first run (e.g. quiet)")
    ap.add_argument("second", type=Path, help="output root of the second run (e.g. busy)")
    args = ap.parse_args()
    rows = compare(board(args.first), board(args.second))
    for r in rows:
        print(f"{r['study']}: {r['techniques']} techniques; point-score ranks moved "
              f"{r['point_ranks_moved']}; tied ranks moved {r['tied_ranks_moved']}; "
              f"contradicting pairs: {r['contradictions'] or 'none'}")
        print(r["table"].round(3).to_string(), "\n")
    sys.exit(1 if any(r["contradictions"] for r in rows) else 0)


if __name__ == "__main__":
    main()
