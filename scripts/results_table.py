"""Runs the synthetic comparison (k-means on the initial ImageNet features, raw-pixel k-means,
MDC, PiCIE without cross-view loss, PiCIE, PiCIE + H, IIC; all from the same init but IIC-res12)
over several seeds at the same budget, as one `picie-jax study` per config in
<workdir>/<config name>, scores each run's network with the linear probe (`picie-jax probe`), and
writes the comparison to <out>.md (the table) and <out>.json (per-seed numbers).

  python scripts/results_table.py --seeds 1 2 3 --jobs 2

With `--jobs N` (N > 1) it first trains N runs at once (`picie-jax study --only INDEX`, as a
cluster would); the `picie-jax study` call per config then finds them finished and only
aggregates. Finished runs are skipped, so an interrupted table resumes.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from picie_jax import probe
from picie_jax import study

METHODS = (
    (
        "k-means on the initial ImageNet features (no training)",
        "configs/imagenet_kmeans_synthetic.py",
    ),
    ("raw-pixel k-means", "configs/pixel_kmeans_synthetic.py"),
    ("MDC", "configs/mdc_synthetic.py"),
    ("PiCIE without cross-view loss", "configs/picie_nocross_synthetic.py"),
    ("PiCIE", "configs/synthetic.py"),
    ("PiCIE + H (overclustering)", "configs/picie_h_synthetic.py"),
    ("IIC (FPN)", "configs/iic_synthetic.py"),
    ("IIC (res12, random init)", "configs/iic_res12_synthetic.py"),
)
SCORES = ("acc", "miou", "thing_miou", "stuff_miou")
PROBE_SCORES = ("acc", "miou")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study_dir(config, args):
  return os.path.join(args.workdir, os.path.basename(config)[:-3])


def study_command(config, args, *extra):
  """The `picie-jax study` command of one config (no sweep: the seeds only)."""
  return [
      sys.executable,
      "-m",
      "picie_jax.main",
      "study",
      f"--config={config}",
      f"--seeds={','.join(map(str, args.seeds))}",
      "--config.progress=False",
      *[f"--config.{o}" for o in args.override],
      f"--workdir={study_dir(config, args)}",
      *extra,
  ]


def probe_scores(run_dir, args):
  """The linear probe's scores of a finished run (probing it first if it has no probe.json)."""
  path = os.path.join(run_dir, probe.PROBE_FILE)
  if not os.path.exists(path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "picie_jax.main",
            "probe",
            f"--workdir={run_dir}",
            "--config.progress=False",
        ],
        cwd=ROOT,
        check=True,
    )
  with open(path) as f:
    return json.load(f)


def run_at_most(commands, jobs, log_dir):
  """Runs the commands, `jobs` at a time; stops at the first failure."""
  os.makedirs(log_dir, exist_ok=True)
  pending, active = list(enumerate(commands)), []
  while pending or active:
    while pending and len(active) < jobs:
      index, cmd = pending.pop(0)
      log_path = os.path.join(log_dir, f"job{index}.txt")
      with open(log_path, "w") as log:
        active.append(
            (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log_path)
        )
      print("started", " ".join(cmd[2:]), flush=True)
    for entry in list(active):
      proc, log_path = entry
      if proc.poll() is not None:
        active.remove(entry)
        if proc.returncode:
          raise SystemExit(f"a run failed (exit {proc.returncode}), see {log_path}")
    time.sleep(2)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
  parser.add_argument("--jobs", type=int, default=1, help="runs at once")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "results"))
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results"))
  parser.add_argument(
      "--override", nargs="*", default=[], help="extra --config.x=v flags applied to every run"
  )
  args = parser.parse_args()

  if args.jobs > 1:
    run_at_most(
        [
            study_command(config, args, f"--only={i}")
            for _, config in METHODS
            for i in range(len(args.seeds))
        ],
        args.jobs,
        os.path.join(args.workdir, "logs"),
    )
  rows, lines = [], []
  for name, config in METHODS:
    # Trains what is not finished yet (nothing after --jobs), then aggregates.
    subprocess.run(study_command(config, args), cwd=ROOT, check=True)
    with open(os.path.join(study_dir(config, args), study.STUDY_JSON)) as f:
      summary = json.load(f)
    (point,) = summary["points"]
    probes = [
        probe_scores(os.path.join(study_dir(config, args), r["name"]), args)
        for r in summary["runs"]
    ]
    rows.append(
        {
            "method": name,
            "config": config,
            "seeds": args.seeds,
            "wall_s": [r["metrics"]["wall_s"] for r in summary["runs"]],
            **{m: [r["metrics"][f"final.{m}"] for r in summary["runs"]] for m in SCORES},
            **{f"probe_{m}": [p[m] for p in probes] for m in PROBE_SCORES},
        }
    )
    cells = [study.format_mean_std(point["metrics"][f"final.{m}"]) for m in SCORES]
    cells += [study.format_mean_std(study.mean_std([p[m] for p in probes])) for m in PROBE_SCORES]
    cells.append(study.format_mean_std(point["metrics"]["wall_s"], digits=0))
    lines.append(f"| {name} | `{config}` | " + " | ".join(cells) + " |")
  with open(args.out + ".json", "w") as f:
    json.dump({"overrides": args.override, "rows": rows}, f, indent=2)
  table = "\n".join(
      [
          "| method | config | pixel acc (%) | mIoU (%) | thing mIoU | stuff mIoU "
          "| probe acc (%) | probe mIoU (%) | wall (s) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
      ]
      + lines
  )
  print(table)
  with open(args.out + ".md", "w") as f:
    f.write(
        f"# Synthetic results ({len(args.seeds)} seeds: {args.seeds})\n\n"
        "Generated by `python scripts/results_table.py "
        + " ".join(f"--override {o}" for o in args.override)
        + "`; mean ± sample std (n − 1) over seeds of the final evaluation (fresh clusters; "
        "IIC: its main head) (K = 8) on the synthetic validation split, and of the linear probe "
        "(`picie-jax probe`: a 1x1 classifier trained on the frozen network's features with the "
        "train labels; no matching). Every run uses the config named, same budget; wall is "
        "training only. Each config's runs, study.md and plot are in its `picie-jax study` "
        "directory.\n\n" + table + "\n\n"
        "The paper's transfer claim (fine-tuning these inits with 1 %, 10 % and 100 % of the "
        "labels) is the table beside this one: [transfer.md](transfer.md), written by "
        "`python scripts/transfer_table.py`.\n"
    )


if __name__ == "__main__":
  main()
