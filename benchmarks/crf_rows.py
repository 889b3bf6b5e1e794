"""Dense-CRF cost: seconds per image of the jitted `core.crf.dense_crf` (STEGO's 10 iterations,
exact kernels) at the synthetic demo's evaluation size and at COCO's.

  python -m benchmarks.crf_rows                      # both rows (COCO: minutes per call on CPU)
  python -m benchmarks.crf_rows --rows synthetic --repeats 5
  python -m benchmarks.crf_rows --rows coco --repeats 1 --out /tmp/crf.json

A row is (side, classes, batch): random logits and a smooth random image, compiled ahead of
time, then `--repeats` timed runs, each with the CPU load of other processes over it. The
appearance kernel is exact, so its cost grows with (side^2)^2 per image: 320^2 holds 625 times
the pixel pairs of 64^2. Prints a table and writes JSON (machine, versions, raw timings).
"""

import argparse
import json
import os
import time

from benchmarks import timing

# name: (side, classes, batch) -- the demo's eval.res/k_test/eval.batch_size, COCO's one image
ROWS = {"synthetic": (64, 8, 64), "coco": (320, 27, 1)}


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--rows", default="synthetic,coco", help="comma-separated: " + ",".join(ROWS))
  p.add_argument("--repeats", type=int, default=3, help="timed runs per row (>= 1)")
  p.add_argument("--chunk-size", type=int, default=0, help="appearance rows per block (0: auto)")
  p.add_argument("--out", default="benchmarks/results/crf.json", help="JSON report path")
  p.add_argument(
      "--threads",
      type=int,
      default=len(os.sched_getaffinity(0)),
      help="threads (default: every CPU of this process)",
  )
  return p.parse_args(argv)


def inputs(side, classes, batch, seed=0):
  """Random logits (B, side, side, K) and a smooth random uint8 image batch."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, side, side, classes)).astype(np.float32)
  coarse = rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8)
  images = np.stack(
      [np.asarray(Image.fromarray(c).resize((side, side), Image.BICUBIC)) for c in coarse]
  )
  return logits, images


def measure(name, repeats, chunk_size):
  """One row: compile ahead of time (timed on its own), then `repeats` timed runs, each with
  the other processes' CPU load over it (the COCO row runs for minutes on a small CPU)."""
  import jax  # pylint: disable=import-outside-toplevel

  from picie_jax.core import crf  # pylint: disable=import-outside-toplevel

  side, classes, batch = ROWS[name]
  logits, images = (jax.device_put(x) for x in inputs(side, classes, batch))
  pixels = side * side
  chunk = chunk_size or crf.default_chunk_size(batch, pixels)
  start = time.perf_counter()
  compiled = crf.dense_crf.lower(logits, images, chunk_size=chunk).compile()
  compile_s = time.perf_counter() - start
  meter = timing.CpuMeter()
  runs = []
  for _ in range(repeats):
    meter.start()
    start = time.perf_counter()
    timing.block(compiled(logits, images))
    runs.append({"seconds": time.perf_counter() - start, "foreign_cores": meter.foreign_cores()})
  stats = timing.summary([r["seconds"] for r in runs])
  # pixel pairs of the appearance kernel: its normaliser once, then one message per iteration
  pairs = batch * pixels * pixels * (crf.STEGO.iterations + 1)
  return {
      "row": name,
      "side": side,
      "classes": classes,
      "batch": batch,
      "chunk_size": chunk,
      "block_bytes": batch * chunk * pixels * 4,
      "compile_s": compile_s,
      "seconds_per_image": stats["median_s"] / batch,
      "kernel_pairs_per_s": pairs / stats["median_s"],
      "mean_foreign_cores": sum(r["foreign_cores"] for r in runs) / len(runs),
      "stats": stats,
      "runs": runs,
  }


def table(rows):
  lines = [
      f"{'row':<10} {'side':>5} {'K':>3} {'batch':>5} {'chunk':>6} {'block MiB':>9} "
      f"{'s/image':>9} {'compile s':>9} {'pairs/s':>9} {'other load':>10}"
  ]
  for r in rows:
    lines.append(
        f"{r['row']:<10} {r['side']:>5} {r['classes']:>3} {r['batch']:>5} {r['chunk_size']:>6} "
        f"{r['block_bytes'] / 2**20:>9.1f} {r['seconds_per_image']:>9.4g} "
        f"{r['compile_s']:>9.3g} {r['kernel_pairs_per_s']:>9.3g} {r['mean_foreign_cores']:>10.2f}"
    )
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  names = [n for n in args.rows.split(",") if n]
  unknown = sorted(set(names) - set(ROWS))
  if unknown:
    raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
  threads = timing.pin_threads(args.threads)
  import jax  # pylint: disable=import-outside-toplevel

  rows = []
  for name in names:
    rows.append(measure(name, args.repeats, args.chunk_size))
    print(table(rows[-1:]), flush=True)
  report = {
      "machine": timing.machine(),
      "versions": timing.versions(),
      "threads": threads,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0]),
      "rows": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(table(rows))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
