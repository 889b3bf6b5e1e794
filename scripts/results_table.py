"""Runs the synthetic comparison (pixel k-means, MDC, PiCIE, PiCIE without cross-view loss)
over several seeds at the same budget and writes docs/results.md and docs/results.json.

  python scripts/results_table.py --seeds 1 2 3 --jobs 2
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

METHODS = (
    ("raw-pixel k-means", "configs/pixel_kmeans_synthetic.py"),
    ("MDC", "configs/mdc_synthetic.py"),
    ("PiCIE without cross-view loss", "configs/picie_nocross_synthetic.py"),
    ("PiCIE", "configs/synthetic.py"),
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
  parser.add_argument("--jobs", type=int, default=2, help="runs at once")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "results"))
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results"))
  parser.add_argument("--override", nargs="*", default=[],
                      help="extra --config.x=v flags applied to every run")
  args = parser.parse_args()

  runs = [(name, cfg, seed) for name, cfg in METHODS for seed in args.seeds]
  pending, active, wall = list(runs), [], {}
  while pending or active:
    while pending and len(active) < args.jobs:
      name, cfg, seed = pending.pop(0)
      workdir = os.path.join(args.workdir, f"{os.path.basename(cfg)[:-3]}_seed{seed}")
      if os.path.exists(os.path.join(workdir, "final.json")):
        continue
      cmd = [sys.executable, "-m", "picie_jax.main", "train", f"--config={cfg}",
             f"--config.seed={seed}", "--config.progress=False", f"--workdir={workdir}",
             *[f"--config.{o}" for o in args.override]]
      os.makedirs(workdir, exist_ok=True)
      log = open(os.path.join(workdir, "log.txt"), "w")
      active.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                     workdir, time.time()))
      print("started", " ".join(cmd[2:]), flush=True)
    for entry in list(active):
      proc, workdir, start = entry
      if proc.poll() is not None:
        active.remove(entry)
        wall[workdir] = time.time() - start
        print(f"finished {workdir} rc={proc.returncode} in {wall[workdir]:.0f}s", flush=True)
        if proc.returncode:
          raise SystemExit(f"run failed, see {workdir}/log.txt")
    time.sleep(2)

  rows = []
  for name, cfg, in METHODS:
    finals = []
    for seed in args.seeds:
      with open(os.path.join(args.workdir, f"{os.path.basename(cfg)[:-3]}_seed{seed}",
                             "final.json")) as f:
        finals.append(json.load(f)["fresh"])
    rows.append({"method": name, "config": cfg, "seeds": args.seeds,
                 **{m: [r[m] for r in finals] for m in ("acc", "miou", "thing_miou",
                                                         "stuff_miou")}})
  with open(args.out + ".json", "w") as f:
    json.dump({"overrides": args.override, "rows": rows}, f, indent=2)
  lines = ["| method | config | pixel acc (%) | mIoU (%) | thing mIoU | stuff mIoU |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    cells = [f"{np.mean(r[m]):.1f} ± {np.std(r[m]):.1f}"
             for m in ("acc", "miou", "thing_miou", "stuff_miou")]
    lines.append(f"| {r['method']} | `{r['config']}` | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print(table)
  with open(args.out + "_table.md", "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
