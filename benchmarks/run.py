"""The benchmark harness: picie_jax against PyTorch, scikit-learn and faiss-cpu, one command.

  python -m benchmarks.run                    # every row: 5 repeats, k-means at 1 M and 4 M
  python -m benchmarks.run --quick            # sized for < 10 min on 2 quiet cores (see --help)
  python -m benchmarks.run --only kmeans --tiny --out /tmp/k.json
  python -m benchmarks.run --show /tmp/k.json   # the table of an earlier (or interrupted) run

Prints a table and writes JSON with the machine, versions, thread settings, every raw timing
(with the foreign CPU load of each round) and the projected COCO epoch. Row groups (--only
takes names or prefixes, comma-separated): coco_train, coco_cluster, coco_label, coco_eval,
demo_train, demo_cluster, demo_label, demo_eval, kmeans, pipeline, backbones. BENCHMARKS.md
explains the rows.
"""

import argparse
import datetime
import functools
import json
import os
import sys

from benchmarks import timing

GROUPS = (
    "coco_train",
    "coco_cluster",
    "coco_label",
    "coco_eval",
    "demo_train",
    "demo_cluster",
    "demo_label",
    "demo_eval",
    "kmeans",
    "pipeline",
    "backbones",
)
FULL_KMEANS_SIZES = (1_000_000, 4_000_000)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
      "--quick",
      action="store_true",
      help="3 repeats instead of 5, k-means at 1 M points only (not 4 M), COCO "
      "batch 4 instead of 8 for the train/cluster/label rows",
  )
  p.add_argument(
      "--tiny",
      action="store_true",
      help="smallest path, for the tests: 2 repeats, k-means 20,000 points, "
      "pipeline 8 images, step rows at batch 2",
  )
  p.add_argument("--only", default="", help="comma-separated row groups or prefixes")
  p.add_argument("--repeats", type=int, help="timed rounds per row (default 5; 3 --quick)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls before (>= 1: compile)")
  p.add_argument(
      "--threads",
      type=int,
      default=len(os.sched_getaffinity(0)),
      help="threads for every framework (default: every CPU of this process)",
  )
  p.add_argument(
      "--max-foreign-load",
      default="0.1",
      help="discard rounds where other processes used more than this many cores "
      "('off' keeps every round)",
  )
  p.add_argument(
      "--max-extra-rounds",
      type=int,
      help="rounds to retry after discarded ones before marking the row "
      "contaminated (default: --repeats)",
  )
  p.add_argument(
      "--kmeans-sizes",
      default="",
      help="comma-separated N for the k-means rows (default 1000000,4000000)",
  )
  p.add_argument("--kmeans-iters", type=int, default=20)
  p.add_argument(
      "--coco-batch", type=int, help="train/k-means batch at COCO shapes (default 8; 4 --quick)"
  )
  p.add_argument(
      "--backbones-shape",
      choices=("demo", "coco"),
      default="demo",
      help="shape of the backbones rows: demo (res1 64, for a CPU) or coco (res1 320: "
      "ViT-S/8 sees 1,600 tokens, for an accelerator)",
  )
  p.add_argument(
      "--backbones-variants",
      default="",
      help="comma-separated subset of the backbones rows' variants (default: all of "
      "resnet18_fpn, vit_s8_linear, vit_s8_stego, vit_s8_stego_frozen)",
  )
  p.add_argument(
      "--backbones-batch",
      type=int,
      help="batch of every phase in the backbones rows (default: --coco-batch's default)",
  )
  p.add_argument(
      "--override",
      nargs="*",
      default=[],
      metavar="KEY=VALUE",
      help="config fields for every step row, e.g. model.dtype=bfloat16",
  )
  p.add_argument(
      "--no-peers",
      action="store_true",
      help="picie_jax only (e.g. on an accelerator, where the peers' CPU builds "
      "would not be comparable)",
  )
  p.add_argument(
      "--no-memory",
      action="store_true",
      help="skip the fresh-process peak-memory runs of the k-means rows",
  )
  p.add_argument(
      "--flops",
      action="store_true",
      help="FLOPs of the train step from XLA's cost analysis (for MFU)",
  )
  p.add_argument(
      "--peak-tflops", type=float, help="the device's peak TFLOP/s, to report MFU with --flops"
  )
  p.add_argument(
      "--bandwidth-tbs",
      type=float,
      help="the device's memory bandwidth in TB/s: k-means rows then report the "
      "floor of one pass (reading the N x D float32 points once)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="benchmarks/results/results.json")
  p.add_argument(
      "--show",
      metavar="JSON",
      help="print the table of an earlier run's JSON (complete or interrupted)",
  )
  args = p.parse_args(argv)
  args.repeats = args.repeats or (2 if args.tiny else 3 if args.quick else 5)
  if args.repeats < 1 or args.warmup < 1:
    p.error(f"--repeats={args.repeats} and --warmup={args.warmup} must be >= 1")
  args.max_foreign_cores = (
      None if args.max_foreign_load.lower() == "off" else float(args.max_foreign_load)
  )
  sizes = args.kmeans_sizes or (
      "20000" if args.tiny else "1000000" if args.quick else ",".join(map(str, FULL_KMEANS_SIZES))
  )
  args.kmeans_sizes = [int(s) for s in sizes.split(",")]
  args.coco_batch = args.coco_batch or (2 if args.tiny else 4 if args.quick else 8)
  args.backbones_batch = args.backbones_batch or (2 if args.tiny else 4 if args.quick else 8)
  wanted = [w for w in args.only.split(",") if w]
  args.groups = [g for g in GROUPS if not wanted or any(g.startswith(w) for w in wanted)]
  unknown = [w for w in wanted if not any(g.startswith(w) for g in GROUPS)]
  if unknown:
    p.error(f"--only {','.join(unknown)}: no such row group; groups are {', '.join(GROUPS)}")
  return args


def step_results(args, shape, groups, results, save):
  """Times the step groups of one shape ('coco' or 'demo') into results['rows']."""
  from benchmarks import step_rows  # pylint: disable=import-outside-toplevel

  overrides = list(args.override)
  if shape == "coco":
    overrides += [f"train.batch_size={args.coco_batch}", f"kmeans.batch_size={args.coco_batch}"]
  if args.tiny:
    overrides += ["train.batch_size=2", "kmeans.batch_size=2", "eval.batch_size=2"]
  try:
    config = step_rows.load_config(shape, overrides)
  except step_rows.MissingField as e:
    for g in groups:
      results["skipped"][g] = str(e)
    save()
    return
  jax_steps = step_rows.JaxSteps(config, args.seed)
  peers = {}
  if not args.no_peers:
    try:
      peers = step_rows.torch_peers(config, args.seed)
    except (timing.MissingPeer, ValueError) as e:
      results["skipped"][f"{shape}: PyTorch peer"] = str(e)
  all_fns = step_rows.step_groups(jax_steps, peers)
  batch_of = {"train": "train", "cluster": "cluster", "label": "cluster", "eval": "eval"}
  for group in groups:
    phase = group.split("_", 1)[1]
    print(f"timing {group} ...", flush=True)
    timed = timing.time_interleaved(
        all_fns[phase], args.repeats, args.warmup, args.max_foreign_cores, args.max_extra_rounds
    )
    results["groups"][group] = timed
    batch, side = jax_steps.sizes[batch_of[phase]]
    calls = jax_steps.calls()
    for name, stats in timed["fns"].items():
      results["rows"][f"{shape}/{name}"] = {
          **stats,
          "batch_size": batch,
          "side": side,
          "group": group,
          "contaminated": timed["contaminated"],
          "images_per_s": batch / stats["median_s"],
          **(
              {"memory": step_rows.compiled_memory(step_rows.compile_call(calls[name]))}
              if name in calls
              else {}
          ),
      }
    if phase == "train" and args.flops:
      results["flops"][shape] = train_step_flops(
          jax_steps, args.peak_tflops, results["rows"][f"{shape}/picie_jax/train_step"]
      )
    results["configs"][shape] = {
        "module": step_rows.SHAPES[shape]["config"],
        "overrides": overrides,
        "config": config.to_dict(),
    }
    save()


def train_step_flops(jax_steps, peak_tflops, row):
  """FLOPs of one steps.train_step from XLA's cost analysis, and the MFU they imply."""
  from benchmarks import step_rows  # pylint: disable=import-outside-toplevel

  compiled = step_rows.compile_call(jax_steps.calls()["picie_jax/train_step"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  out = {
      "flops_per_step": flops,
      "achieved_tflops": flops / row["median_s"] / 1e12,
      "source": "jax.jit(train_step).lower(...).compile().cost_analysis()['flops']",
  }
  if peak_tflops:
    out.update(peak_tflops=peak_tflops, mfu=out["achieved_tflops"] / peak_tflops)
  return out


def kmeans_results(args, results, save):
  from benchmarks import kmeans_rows  # pylint: disable=import-outside-toplevel

  impls = ("picie_jax",) if args.no_peers else kmeans_rows.IMPLEMENTATIONS
  for n in args.kmeans_sizes:
    print(f"timing kmeans N={n:,} ...", flush=True)
    row = kmeans_rows.kmeans_row(
        n,
        128,
        27,
        args.kmeans_iters,
        args.seed,
        args.repeats,
        args.warmup,
        args.max_foreign_cores,
        args.max_extra_rounds,
        measure_memory=not args.no_memory,
        impls=impls,
    )
    # lloyd runs `iters` iterations + a final assignment pass; the peers `iters` passes.
    passes = {"picie_jax": args.kmeans_iters + 1}
    row["seconds_per_pass"] = {
        impl: s["median_s"] / passes.get(impl, args.kmeans_iters)
        for impl, s in row["timing"]["fns"].items()
    }
    if args.bandwidth_tbs:
      row["bandwidth_floor_s_per_pass"] = row["points_bytes"] / (args.bandwidth_tbs * 1e12)
      row["bandwidth_tbs"] = args.bandwidth_tbs
    results["kmeans"][str(n)] = row
    for impl, stats in row["timing"]["fns"].items():
      results["rows"][f"kmeans_{n}/{impl}"] = {
          **stats,
          "batch_size": n,
          "side": 128,
          "group": "kmeans",
          "contaminated": row["timing"]["contaminated"],
      }
    save()


def pipeline_results(args, results, save):
  from benchmarks import pipeline_rows  # pylint: disable=import-outside-toplevel
  from benchmarks import step_rows  # pylint: disable=import-outside-toplevel

  print("timing pipeline ...", flush=True)
  config = step_rows.load_config("coco", [f"train.batch_size={args.coco_batch}"])
  row = pipeline_rows.pipeline_row(
      config,
      args.repeats,
      args.warmup,
      args.max_foreign_cores,
      args.max_extra_rounds,
      count=8 if args.tiny else 64,
  )
  results["pipeline"] = row
  stats = row["timing"]["fns"]["picie_jax/input_pipeline"]
  results["rows"]["pipeline/picie_jax/input_pipeline"] = {
      **stats,
      "batch_size": row["images"],
      "side": row["res2"],
      "group": "pipeline",
      "contaminated": row["timing"]["contaminated"],
      "images_per_s": row["images_per_s"],
  }
  save()


def backbone_results(args, results, save):
  from benchmarks import backbone_rows  # pylint: disable=import-outside-toplevel
  from benchmarks import step_rows  # pylint: disable=import-outside-toplevel

  print(f"timing backbones ({args.backbones_shape}) ...", flush=True)
  # --tiny: one ViT block, so the test compiles in seconds.
  overrides = list(args.override) + (["model.vit_depth=1"] if args.tiny else [])
  try:
    group = backbone_rows.backbone_group(
        args.backbones_shape,
        [v for v in args.backbones_variants.split(",") if v],
        args.backbones_batch,
        overrides,
        args.seed,
        (args.repeats, args.warmup, args.max_foreign_cores, args.max_extra_rounds),
    )
  except step_rows.MissingField as e:
    results["skipped"]["backbones"] = str(e)
    save()
    return
  results["groups"]["backbones"] = group["timing"]
  results["rows"].update({f"backbones/{name}": row for name, row in group["rows"].items()})
  results["attention"] = group["attention"]
  results["configs"].update({f"backbones/{v}": c for v, c in group["configs"].items()})
  save()


def ratios(rows):
  """Speed ratios (time of picie_jax / time of the peer; < 1 means picie_jax is faster), each
  between rows of one interleaved group."""
  out = {}

  def median(name):
    return rows.get(name, {}).get("median_s")

  def add(label, mine, theirs):
    if mine is not None and theirs is not None:
      out[label] = mine / theirs

  for shape in ("coco", "demo"):
    for layout in ("nchw", "channels_last"):
      t = f"{shape}/torch_{layout}"
      train_t, label_t = median(f"{t}/train_step"), median(f"{t}/train_labels")
      train_j, label_j = (
          median(f"{shape}/picie_jax/train_step"),
          median(f"{shape}/picie_jax/label_recompute"),
      )
      add(f"{shape} train step / torch {layout} (labels cached in both)", train_j, train_t)
      add(
          f"{shape} train step + its labels / torch {layout} (train step + its labels)",
          None if train_j is None or label_j is None else train_j + label_j,
          None if train_t is None or label_t is None else train_t + label_t,
      )
      fwd, opt = median(f"{shape}/picie_jax/views_forward_backward"), median(
          f"{shape}/picie_jax/optimizer"
      )
      add(
          f"{shape} views+forward+backward+Adam / torch {layout} train step",
          None if fwd is None or opt is None else fwd + opt,
          train_t,
      )
      add(
          f"{shape} cluster step (2 views) / torch {layout}",
          median(f"{shape}/picie_jax/cluster_step"),
          median(f"{t}/cluster_step"),
      )
      add(
          f"{shape} label step / torch {layout}",
          median(f"{shape}/picie_jax/label_step"),
          median(f"{t}/label_step"),
      )
      add(
          f"{shape} eval step / torch {layout}",
          median(f"{shape}/picie_jax/eval_step"),
          median(f"{t}/eval_step"),
      )
  for name in rows:
    if name.startswith("kmeans_") and name.endswith("/picie_jax"):
      size = name.split("/")[0]
      for peer in ("scikit-learn", "faiss-cpu"):
        add(f"{size} picie_jax / {peer}", median(name), median(f"{size}/{peer}"))
  return out


def _fmt(seconds):
  return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def _mib(num_bytes):
  return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def print_memory(results):
  """XLA's compiled memory of the rows that are one jitted call (and parameters where known),
  and the attention memory of the backbones group."""
  rows = {name: r for name, r in results["rows"].items() if r.get("memory") or "params" in r}
  if rows:
    print(
        f"\n{'compiled memory, MiB (XLA memory_analysis)':<48}{'temp':>10}{'arguments':>11}"
        f"{'outputs':>10}{'params M (trained)':>21}"
    )
  for name, r in rows.items():
    memory = r.get("memory") or {}
    params = f"{r['params'] / 1e6:.2f} ({r['trained_params'] / 1e6:.2f})" if "params" in r else "-"
    print(
        f"{name:<48}{_mib(memory.get('temp_bytes')):>10}{_mib(memory.get('argument_bytes')):>11}"
        f"{_mib(memory.get('output_bytes')):>10}{params:>21}"
    )
  a = results.get("attention")
  if a:
    naive = a["naive_bytes_per_block"]
    print(
        f"attention of {a['backbone']} at {a['res1']}^2 ({a['tokens']} tokens, {a['heads']} "
        f"heads), batch {a['batch_size']}: naive B*heads*T^2*4 = {_mib(naive)} MiB per block; "
        f"dot_product_attention alone (float32) temp {_mib(a['attention_op_forward_temp_bytes'])}"
        f" MiB forward, {_mib(a['attention_op_grad_temp_bytes'])} MiB forward + backward"
    )
    for depth, temp in a["vit_temp_bytes"].items():
      print(
          f"  ViT ({a['model_dtype']}) with {depth} block(s): temp {_mib(temp['forward'])} MiB "
          f"forward, {_mib(temp['grad'])} MiB gradient"
      )
    per_block = a["vit_grad_temp_bytes_per_block"]
    if per_block is not None:
      print(
          f"  gradient temp per added block {_mib(per_block)} MiB = "
          f"{per_block / naive:.2f} x the naive attention matrix"
      )


def print_table(results):
  m, t = results["machine"], results["threads"]
  print(
      f"\n{results['date']} | {m['cpu_model']}, {m['cores']} cores, "
      f"{m['memory_bytes'] / 2**30:.0f} GiB | threads {t['threads']} | backend "
      f"{results['backend']} | foreign-load threshold "
      f"{results['settings']['max_foreign_cores'] or 'off'} cores"
  )
  print(
      f"{'row':<48}{'batch':>9}{'side':>6}{'min ms':>10}{'median ms':>11}{'max ms':>10}"
      f"{'img/s':>9}{'compile s':>10}{'foreign':>8}"
  )
  for name, r in results["rows"].items():
    group = results["groups"].get(r["group"]) or {}
    foreign = [x["foreign_cores"] for x in group.get("rounds", [])]
    if r["group"] == "kmeans":
      group = results["kmeans"][name.split("/")[0].split("_")[1]]["timing"]
      foreign = [x["foreign_cores"] for x in group["rounds"]]
    if r["group"] == "pipeline":
      foreign = [x["foreign_cores"] for x in results["pipeline"]["timing"]["rounds"]]
    ips = r.get("images_per_s")
    print(
        f"{name:<48}{r['batch_size']:>9}{r['side']:>6}{_fmt(r['min_s']):>10}"
        f"{_fmt(r['median_s']):>11}{_fmt(r['max_s']):>10}"
        f"{'-' if ips is None else f'{ips:.1f}':>9}{r['compile_s']:>10.1f}"
        f"{max(foreign, default=0):>8.2f}{' CONTAMINATED' if r['contaminated'] else ''}"
    )
  print(
      "foreign = most cores other processes used during one timed round; compile s = first "
      "call - median"
  )
  print_memory(results)
  for n, row in results["kmeans"].items():
    ref = min(row["inertia"].values())
    parts = [f"{impl} {v:.6f} ({100 * (v / ref - 1):+.3f}%)" for impl, v in row["inertia"].items()]
    print(f"k-means N={int(n):,}: inertia (ours, float64) " + ", ".join(parts))
    print(
        "  ms per pass: "
        + ", ".join(f"{impl} {1e3 * s:.2f}" for impl, s in row.get("seconds_per_pass", {}).items())
        + (
            f"; memory-bandwidth floor {1e3 * row['bandwidth_floor_s_per_pass']:.2f} ms "
            f"(points read once at {row['bandwidth_tbs']} TB/s)"
            if "bandwidth_floor_s_per_pass" in row
            else ""
        )
    )
    mem = {impl: v for impl, v in row["peak_memory"].items() if v}
    if mem:
      print(
          "  peak RSS (VmHWM, fresh process, points included "
          f"{row['points_bytes'] / 2**20:.0f} MiB): "
          + ", ".join(
              f"{impl} {v['peak_rss_bytes'] / 2**20:.0f} MiB"
              if "peak_rss_bytes" in v
              else f"{impl} error: {v['error']}"
              for impl, v in mem.items()
          )
      )
  for shape, f in results["flops"].items():
    print(
        f"{shape} train step: {f['flops_per_step'] / 1e12:.2f} TFLOP per step (XLA cost "
        f"analysis), {f['achieved_tflops']:.1f} TFLOP/s"
        + (f", MFU {100 * f['mfu']:.1f}% of {f['peak_tflops']} TFLOP/s" if "mfu" in f else "")
    )
  for label, value in results["ratios"].items():
    print(f"ratio {label}: {value:.2f}x")
  proj = results.get("projection")
  if proj and proj["minutes"]:
    ref = proj["reference_v100_minutes"]
    print(
        f"\nprojected COCO-Stuff epoch ({proj['images']['train']:,} train, "
        f"{proj['images']['val']:,} val images), minutes on this machine; reference on a "
        f"V100: {ref['epoch']} (cluster {ref['cluster']}, label {ref['label']})"
    )
    phases = ("cluster", "label", "train", "eval", "epoch")
    print(f"{'implementation':<24}" + "".join(f"{p:>10}" for p in phases))
    for impl, minutes in proj["minutes"].items():
      print(f"{impl:<24}" + "".join(f"{minutes[p]:>10.1f}" for p in phases))
    if "input_minutes" in proj:
      print(f"input pipeline alone for picie_jax's passes: {proj['input_minutes']:.1f} min")
  for what, why in results["skipped"].items():
    print(f"skipped {what}: {why}")


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.show:
    with open(args.show) as f:
      print_table(json.load(f))
    return
  threads = timing.pin_threads(args.threads)
  import jax  # pylint: disable=import-outside-toplevel

  threads["peers"] = timing.pin_peer_threads(args.threads)
  from benchmarks import projection  # pylint: disable=import-outside-toplevel

  results = {
      "command": [
          sys.executable,
          "-m",
          "benchmarks.run",
          *(sys.argv[1:] if argv is None else argv),
      ],
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "machine": timing.machine(),
      "versions": timing.versions(),
      "threads": threads,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "settings": {k: v for k, v in vars(args).items() if k != "groups"},
      "row_groups": args.groups,
      "rows": {},
      "groups": {},
      "kmeans": {},
      "flops": {},
      "configs": {},
      "skipped": {},
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  measurements = [
      (shape, functools.partial(step_results, args, shape, groups))
      for shape in ("coco", "demo")
      if (groups := [g for g in args.groups if g.startswith(shape + "_")])
  ]
  if "kmeans" in args.groups:
    measurements.append(("kmeans", functools.partial(kmeans_results, args)))
  if "pipeline" in args.groups:
    measurements.append(("pipeline", functools.partial(pipeline_results, args)))
  if "backbones" in args.groups:
    measurements.append(("backbones", functools.partial(backbone_results, args)))

  def save():
    """Derived numbers and the JSON, after every group: an interrupted run keeps its rows."""
    results["ratios"] = ratios(results["rows"])
    coco_rows = {
        name.split("/", 1)[1]: r for name, r in results["rows"].items() if name.startswith("coco/")
    }
    results["projection"] = projection.project(coco_rows)
    if "pipeline" in results:
      results["projection"]["input_minutes"] = projection.input_minutes(
          results["pipeline"]["images_per_s"]
      )
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1, default=str)

  for _, measure in measurements:
    measure(results, save)
  print_table(results)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
