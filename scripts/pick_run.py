"""Name the run to ship from a device session's runs, by the held-out split alone, and write the
ablation table of every run beside it.

    python scripts/pick_run.py RUNS_DIR --candidates main second-seed distilled --out chosen.json --table ablation.md

The rule, fixed before any run (#34): among the candidates that finished their schedule, the
weights (trained, or their moving average) with the highest accuracy on the 5,000 held-out images
at the end of the run; a tie goes to the earlier candidate in the list, then to the trained
weights. The figure read is the engine's own validation of the final weights after the last epoch
(results.json: test_acc and ema_val_acc); no other figure, and no test set, enters the choice.
The ablation runs are reported, never shipped: each leaves out part of the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def final(history: dict, key: str) -> float | None:
    values = [v for v in history.get(key, []) if v is not None]
    return values[-1] if values else None


def summary(run: Path) -> dict | None:
    """What a run's results.json says of it; None if it wrote none (it failed or was cut off)."""
    path = run / "results.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    history, budget = results["history"], results.get("time_budget") or {}
    return {"name": run.name, "finished": not results["stopped"], "epochs": len(history["test_acc"]),
            "planned_epochs": budget.get("epochs"), "seconds": round(results["seconds"], 1),
            "trained": final(history, "test_acc"), "ema": final(history, "ema_val_acc"),
            "recipe": results["recipe"], "plan": budget.get("reason")}


def pick(runs: list[dict], candidates: list[str]) -> dict | None:
    """The rule in the module's docstring."""
    best = None
    for name in candidates:
        run = next((r for r in runs if r["name"] == name and r["finished"]), None)
        for weights in ("trained", "ema"):
            if run is not None and run[weights] is not None and (best is None or run[weights] > best["accuracy"]):
                best = {"run": name, "weights": weights, "accuracy": run[weights]}
    return best


def table(runs: list[dict], candidates: list[str], teacher: dict | None) -> str:
    rows = ["| run | role | epochs (planned) | held-out accuracy, trained | moving average | seconds |",
            "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["name"] not in candidates, r["name"])):
        acc = lambda v: f"{v:.2%}" if v is not None else "-"  # noqa: E731
        role = "candidate" if r["name"] in candidates else "ablation"
        state = "" if r["finished"] else ", stopped"
        rows.append(f"| {r['name']} | {role}{state} | {r['epochs']} ({r['planned_epochs']}) | {acc(r['trained'])} | "
                    f"{acc(r['ema'])} | {r['seconds']:.0f} |")
    if teacher is not None:
        rows.append(f"\nCNN teacher: {teacher['parameters']:,} parameters, {teacher['epochs']} epochs in "
                    f"{teacher['seconds']:.0f} s, {teacher['val_acc']:.2%} on the same held-out images.")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the folder holding one folder per run")
    parser.add_argument("--candidates", nargs="+", required=True, help="the runs that may be shipped, in order")
    parser.add_argument("--teacher", type=Path, help="the teacher's folder, for the table")
    parser.add_argument("--out", type=Path, required=True, help="chosen.json")
    parser.add_argument("--table", type=Path, required=True, help="the ablation table (markdown)")
    args = parser.parse_args(argv)

    runs = [s for run in sorted(args.runs.iterdir()) if run.is_dir() and (s := summary(run)) is not None]
    teacher = None
    if args.teacher is not None and (args.teacher / "teacher.safetensors").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from vitdemo.teacher import load_teacher

        teacher = load_teacher(args.teacher)[1]
    chosen = pick(runs, args.candidates)
    args.out.write_text(json.dumps({"chosen": chosen, "runs": runs}, indent=2))
    args.table.write_text(table(runs, args.candidates, teacher))
    print(args.table.read_text())
    print(f"chosen: {chosen}" if chosen else "chosen: none (no candidate finished)")
    return 0 if chosen else 1


if __name__ == "__main__":
    raise SystemExit(main())
