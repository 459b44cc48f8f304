"""Summarises bench/ep_scaling.sh: loss curves side by side and the weak-scaling efficiency."""

import json
import os
import sys

import numpy as np


def read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r for r in map(json.loads, f)}


def main(out, one, two_same, two_double):
  runs = {name: read(os.path.join(out, name)) for name in (one, two_same, two_double)}
  steps = sorted(set(runs[one]) & set(runs[two_same]))
  print(f"| step | loss {one} | loss {two_same} | rel. diff |")
  print("|---|---|---|---|")
  diffs = []
  for s in steps:
    a, b = runs[one][s]["loss"], runs[two_same][s]["loss"]
    diffs.append(abs(a - b) / abs(a))
    print(f"| {s} | {a:.4f} | {b:.4f} | {diffs[-1]:.1e} |")
  # Throughput: median over log windows after the first (which holds compilation).
  rate = {n: float(np.median([r["images_per_sec"] for s, r in sorted(m.items())[1:]]))
          for n, m in runs.items()}
  summary = {"max_rel_loss_diff": max(diffs), "images_per_sec": rate,
             "weak_scaling_efficiency": rate[two_double] / (2 * rate[one])}
  print(json.dumps(summary, indent=1))
  with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:])
