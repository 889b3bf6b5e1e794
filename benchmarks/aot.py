"""Every step of an epoch compiled ahead of time for a TPU topology, from any host.

  python -m benchmarks.aot --topology v5e:4x8 --config configs/coco_stuff27.py \
      [--config.model.dtype=bfloat16] [--out aot.json]

Needs libtpu (`pip install -e '.[tpu]'`), not a TPU: `jax.experimental.topologies` describes the
slice's devices, the project's own mesh and shardings are built over them, the state is
abstract (`jax.eval_shape`), and each step is lowered and compiled with the recipe's global
shapes and the accelerator forms of its ops (platform.platform_of(mesh)). Per step it reports
compile time, per-chip memory against the chip's HBM (a step that does not fit is an error
naming the config fields to change), FLOPs and bytes per chip, the collectives of the optimized
HLO and any host callback, then a roofline bound per step and for a COCO-Stuff epoch. The bound
is max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip: no measurement, a floor.
"""

import collections
import json
import os
import re
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from picie_jax import config_check
from picie_jax import parallel
from picie_jax import platform
from picie_jax import steps
from picie_jax.core import kmeans
from picie_jax.models import fpn

# Per chip: peak dense bf16 FLOP/s, HBM bytes/s, HBM bytes. Sources: cloud.google.com/tpu/docs/
# v5e ("197 TFLOPs bf16, 819 GBps, 16 GiB HBM"), .../v5p ("459 TFLOPs bf16, 2765 GBps, 95 GiB"),
# .../v4 ("275 TFLOPs bf16, 1200 GBps, 32 GiB"). float32 matmuls run as several bf16 passes, so
# the FLOP bound of a float32 step is optimistic.
CHIPS = {
    "TPU v5 lite": (197e12, 819e9, 16 * 2**30),
    "TPU v5": (459e12, 2765e9, 95 * 2**30),
    "TPU v4": (275e12, 1200e9, 32 * 2**30),
}
# COCO-Stuff-27 (curated IIC split): train and val images of one epoch.
COCO_TRAIN_IMAGES, COCO_VAL_IMAGES = 49_629, 2_175
REFERENCE_EPOCH = "93 min per COCO-Stuff epoch on one V100 (the reference PyTorch code)"
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined only when it runs: importing this module (the tests do, beside
  picie_jax.main's own --config) defines none."""
  config_flags.DEFINE_config_file("config", None, "Recipe (e.g. configs/coco_stuff27.py).")
  flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:2x2, v5e:4x8, v5p:4x4x4.")
  flags.DEFINE_string("out", "", "Write the report as JSON here.")
  flags.DEFINE_list("steps", [], "Compile only these steps (default: every step of an epoch).")
  flags.DEFINE_bool("breakdown", False, "Print each step's biggest byte movers (HLO).")
  flags.DEFINE_string("hlo_dir", "", "Write each step's optimized HLO here as <step>.hlo.txt.")


def topology_devices(name):
  """The devices of a TPU slice `name` (e.g. 'v5e:4x8'), described by libtpu on this host."""
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except RuntimeError as e:
    if "TPU support not installed" not in str(e):
      raise
    sys.exit(f"benchmarks.aot needs libtpu to compile for {name}: pip install -e '.[tpu]'")


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _abstract_batch(mesh, batch_size, side, labels_shape=None, eval_labels=False):
  rows = parallel.rows_sharded(mesh)
  batch = {
      "image": _sds((batch_size, side, side, 3), jnp.uint8, rows),
      "index": _sds((batch_size,), jnp.int32, rows),
      "mask": _sds((batch_size,), jnp.bool_, rows),
  }
  if labels_shape:
    batch["labels"] = _sds((batch_size, *labels_shape), jnp.uint8, rows)
  if eval_labels:
    batch["label"] = _sds((batch_size, side, side), jnp.int32, rows)
  return batch


def _replicated_shapes(tree, mesh):
  return jax.tree.map(lambda a: _sds(a.shape, a.dtype, parallel.replicated(mesh)), tree)


def abstract_state(config, model, step_config, mesh):
  """(TrainState, EpochTargets) as ShapeDtypeStructs replicated over the mesh (nothing runs)."""
  num_views = step_config.num_views
  k = config.kmeans.k_train
  channels = step_config.feature_channels
  tx = steps.make_optimizer(
      config.train.lr, config.train.weight_decay, steps.trains_classifier(step_config)
  )

  def build():
    variables = steps.init_variables(model, jax.random.key(0), config.res1)
    classifier = steps.initial_classifier(jax.random.key(1), step_config, k)
    state = steps.TrainState.create(variables, classifier, tx)
    targets = steps.EpochTargets(
        frozen=dict(variables),
        centroids=jnp.zeros((num_views, k, channels), jnp.float32),
        weights=jnp.ones((num_views, k), jnp.float32),
    )
    return state, targets

  return _replicated_shapes(jax.eval_shape(build), mesh)


def epoch_steps(config, mesh):
  """{name: (jitted function, abstract args, kwargs, calls per COCO epoch)} for every step."""
  step_config = steps.step_config_from_config(config, mesh)
  model = fpn.model_from_config(config.model, platform.platform_of(mesh))
  state, targets = abstract_state(config, model, step_config, mesh)
  k, side = config.kmeans.k_train, config.res1 // step_config.feature_stride
  scalar = _sds((), jnp.int32, parallel.replicated(mesh))
  key = _replicated_shapes(jax.eval_shape(lambda: jax.random.PRNGKey(0)), mesh)
  cluster_batch = _abstract_batch(mesh, config.kmeans.batch_size, config.res2)
  labels_shape = (step_config.num_views, side, side) if step_config.cached_labels else None
  train_batch = _abstract_batch(mesh, config.train.batch_size, config.res2, labels_shape)
  eval_batch_size = parallel.padded_batch_size(config.eval.batch_size, mesh.size)
  eval_batch = _abstract_batch(mesh, eval_batch_size, config.eval.res, eval_labels=True)
  points = config.kmeans.batch_size * side * side
  rows = parallel.rows_sharded(mesh)
  channels = step_config.feature_channels
  kmeans_state = _replicated_shapes(
      kmeans.MiniBatchState(
          jax.ShapeDtypeStruct((k, channels), jnp.float32), jax.ShapeDtypeStruct((k,), jnp.float32)
      ),
      mesh,
  )
  buffer_batches = config.kmeans.num_init_batches
  per_image = config.kmeans.init_pixels_per_image or side * side
  buffer_rows = config.kmeans.batch_size * per_image
  buffer_spec = parallel.rows_sharded(mesh, axis=1)
  buffer_dtype = jnp.dtype(config.kmeans.buffer_dtype)
  per_epoch = {
      "cluster": COCO_TRAIN_IMAGES / config.kmeans.batch_size,
      "train": COCO_TRAIN_IMAGES / config.train.batch_size,
      "eval": COCO_VAL_IMAGES / eval_batch_size,
  }
  return {
      "cluster_features": (
          steps.cluster_features,
          (
              model,
              state.params["network"],
              [state.batch_stats] * step_config.num_views,
              cluster_batch,
              scalar,
              key,
          ),
          {"step_config": step_config},
          per_epoch["cluster"],
      ),
      "kmeans_minibatch_update": (
          kmeans._minibatch_on_mesh,
          (
              kmeans_state,
              _sds((points, channels), jnp.float32, rows),
              _sds((points,), jnp.bool_, rows),
              mesh,
              config.kmeans.chunk_size,
          ),
          {},
          step_config.num_views * per_epoch["cluster"],
      ),
      "kmeans_lloyd_init": (
          kmeans._lloyd_on_mesh,
          (
              _sds((buffer_batches, buffer_rows, channels), buffer_dtype, buffer_spec),
              _sds((buffer_batches, buffer_rows), jnp.bool_, buffer_spec),
              _sds((k, channels), jnp.float32, parallel.replicated(mesh)),
              config.kmeans.iters,
              mesh,
              config.kmeans.chunk_size,
          ),
          {},
          step_config.num_views,
      ),
      "label_counts": (
          steps.label_counts,
          (model, targets, cluster_batch, scalar, key),
          {"step_config": step_config},
          per_epoch["cluster"],
      ),
      "train_step": (
          steps.train_step,
          (model, state, targets, train_batch, scalar, key),
          {"step_config": step_config},
          per_epoch["train"],
      ),
      "eval_step": (
          steps.eval_step,
          (
              model,
              state.variables,
              _sds((k, channels + 1), jnp.float32, parallel.replicated(mesh)),
              eval_batch,
          ),
          {"step_config": step_config, "num_true": config.eval.k_test},
          per_epoch["eval"],
      ),
  }


def _shape_bytes(text):
  """Bytes of an HLO result shape such as 'f32[4,128]{1,0}' or a tuple of them."""
  sizes = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f16": 2}
  total = 0
  for dtype, dims in re.findall(r"\b(f32|bf16|s32|u32|s8|u8|pred|f16)\[([\d,]*)\]", text):
    count = 1
    for d in filter(None, dims.split(",")):
      count *= int(d)
    total += sizes[dtype] * count
  return total


def collectives(hlo_text):
  """{op: {'count', 'bytes'}} of the collectives in optimized HLO, result bytes per chip; ops
  inside loop bodies count once (the text is static)."""
  found = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*(.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(", line)
    if match:
      op = found[match.group(2)]
      op["count"] += 1
      op["bytes"] += _shape_bytes(match.group(1))
  return dict(found)


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f16": 2}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.+?) ([\w-]+)\((.*)$")
_NO_TRAFFIC = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all")


def padded_bytes(shape_text):
  """Bytes of an HLO shape in its TPU memory layout: each array's dimensions padded to its
  first tile, e.g. f32[640,3]{1,0:T(8,128)} takes 640 x 128 x 4 bytes, not 640 x 3 x 4."""
  total = 0
  for dtype, dims_text, layout in _ARRAY.findall(shape_text):
    dims = [int(d) for d in dims_text.split(",") if d]
    tile = re.search(r":T\(([\d,]+)\)", layout or "")
    order = re.match(r"\{([\d,]*)", layout or "")
    if tile and order and order.group(1):
      minor_to_major = [int(d) for d in order.group(1).split(",")]
      sizes = [int(t) for t in tile.group(1).split(",")]
      for size, dim in zip(reversed(sizes), minor_to_major):
        dims[dim] = -(-dims[dim] // size) * size
    count = 1
    for d in dims:
      count *= d
    total += _DTYPE_BYTES[dtype] * count
  return total


def byte_movers(hlo_text, top=8):
  """The instructions of the optimized HLO's unfused computations that move the most HBM
  bytes (padded result + operands), with their JAX op name: which instructions a step's bytes
  come from. A ranking, not the compiler's total: loop bodies count once, async copies count
  their tuples whole, fused computations are inside their fusion's numbers."""
  fused = set(re.findall(r"(?:calls|to_apply)=%([\w.-]+)", hlo_text))
  rows, shapes, name, skip = [], {}, None, False
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%([\w.-]+) .*\{$", line)
    if header:
      name, skip, shapes = header.group(2), header.group(2) in fused, {}
      continue
    match = _INSTRUCTION.match(line)
    if not match or skip:
      continue
    _, result, shape, opcode, rest = match.groups()
    shapes[result] = padded_bytes(shape)
    if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
      continue
    operands = re.findall(r"%([\w.-]+)", rest.split("), ")[0])
    op_name = re.search(r'op_name="([^"]*)"', rest)
    rows.append(
        {
            "bytes": shapes[result] + sum(shapes.get(o, 0) for o in operands),
            "opcode": opcode,
            "shape": re.sub(r"\{[^}]*\}", "", shape)[:60],
            "op_name": op_name.group(1)[-90:] if op_name else "",
            "computation": name,
        }
    )
  return sorted(rows, key=lambda r: -r["bytes"])[:top]  # top=None: all


def host_calls(hlo_text):
  """Instructions that would involve the host (callbacks, infeed/outfeed, send/recv)."""
  names = []
  for line in hlo_text.splitlines():
    if re.search(r"\s(outfeed|infeed|send|recv)\(", line) or "callback" in line.lower():
      names.append(line.strip()[:160])
  return names


def compile_step(name, fn, args, kwargs, hlo_dir=""):
  """Lowers and compiles one step; returns its report row (without the bound). With `hlo_dir`,
  writes the optimized HLO there."""
  start = time.perf_counter()
  compiled = fn.lower(*args, **kwargs).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  hlo = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
      f.write(hlo)
  return {
      "step": name,
      "compile_s": seconds,
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "code_bytes": memory.generated_code_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "flops": float(cost.get("flops", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "collectives": collectives(hlo),
      "host_calls": host_calls(hlo),
      "byte_movers": byte_movers(hlo),
  }


def peak_bytes(row):
  return (
      row["argument_bytes"]
      + row["output_bytes"]
      - row["alias_bytes"]
      + row["temp_bytes"]
      + row["code_bytes"]
  )


_FIELDS_TO_SHRINK = {
    "cluster_features": "config.kmeans.batch_size",
    "kmeans_minibatch_update": "config.kmeans.batch_size or config.kmeans.chunk_size",
    "kmeans_lloyd_init": (
        "config.kmeans.num_init_batches, config.kmeans.init_pixels_per_image or "
        "config.kmeans.buffer_dtype='bfloat16'"
    ),
    "label_counts": "config.kmeans.batch_size",
    "train_step": "config.train.batch_size or config.model.dtype='bfloat16'",
    "eval_step": "config.eval.batch_size",
}


def report(config, topology, only=(), breakdown=False, hlo_dir=""):
  """Compiles every step (or those named in `only`) for `topology`; returns the JSON-able
  report. With `breakdown`, prints each step's biggest byte movers; with `hlo_dir`, writes each
  step's optimized HLO there."""
  devices = topology_devices(topology)
  mesh = parallel.make_mesh(devices)
  num_hosts = len({d.process_index for d in devices})
  config_check.check_batch_sizes(config, mesh.size, num_hosts)  # as a run on the pod would
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise ValueError(f"no peak numbers for {kind!r} in benchmarks/aot.py CHIPS")
  peak_flops, hbm_bandwidth, hbm_bytes = CHIPS[kind]
  rows, epoch_s = [], 0.0
  epoch = epoch_steps(config, mesh)
  unknown = set(only) - set(epoch)
  if unknown:
    raise ValueError(f"--steps names no step {sorted(unknown)}; the steps: {list(epoch)}")
  for name, (fn, args, kwargs, per_epoch) in epoch.items():
    if only and name not in only:
      continue
    row = compile_step(name, fn, args, kwargs, hlo_dir)
    row["peak_bytes"] = peak_bytes(row)
    if row["peak_bytes"] > hbm_bytes:
      raise MemoryError(
          f"{name} needs {row['peak_bytes'] / 2**30:.2f} GiB per chip on {topology} "
          f"({kind}: {hbm_bytes / 2**30:.0f} GiB HBM): lower {_FIELDS_TO_SHRINK[name]}, "
          "or use more chips"
      )
    flops_s, bytes_s = row["flops"] / peak_flops, row["bytes_accessed"] / hbm_bandwidth
    row["bound_s"] = max(flops_s, bytes_s)
    row["limited_by"] = "flops" if flops_s >= bytes_s else "bytes"
    row["calls_per_coco_epoch"] = per_epoch
    epoch_s += row["bound_s"] * per_epoch
    rows.append(row)
    print(_format_row(row), flush=True)
    if breakdown:
      for mover in row["byte_movers"]:
        print(
            f"    {mover['bytes'] / 1e9:7.2f} GB  {mover['opcode']:<14} {mover['shape']:<40} "
            f"{mover['op_name']}"
        )
  return {
      "topology": topology,
      "chips": mesh.size,
      "device_kind": kind,
      "platform": platform.platform_of(mesh),
      "model_dtype": config.model.dtype,
      "chip_peaks": {"flops": peak_flops, "hbm_bytes_per_s": hbm_bandwidth, "hbm": hbm_bytes},
      "steps": rows,
      "coco_epoch_bound_s": epoch_s,
      "note": (
          "roofline bounds per chip (max of FLOPs/peak and bytes/HBM bandwidth), not "
          f"measurements; reference: {REFERENCE_EPOCH}"
      ),
  }


_HEADER = (
    f"{'step':<24} {'compile s':>9} {'peak GiB':>8} {'temp GiB':>8} {'GFLOP':>9} "
    f"{'GB acc.':>8} {'bound ms':>9} {'by':>5}  collectives (count, MiB)"
)


def _format_row(row):
  coll = ", ".join(
      f"{op} {c['count']}x {c['bytes'] / 2**20:.1f}" for op, c in sorted(row["collectives"].items())
  )
  host = f"  HOST: {len(row['host_calls'])}" if row["host_calls"] else ""
  return (
      f"{row['step']:<24} {row['compile_s']:9.1f} {row['peak_bytes'] / 2**30:8.2f} "
      f"{row['temp_bytes'] / 2**30:8.2f} {row['flops'] / 1e9:9.1f} "
      f"{row['bytes_accessed'] / 1e9:8.2f} {row['bound_s'] * 1e3:9.2f} {row['limited_by']:>5}  "
      f"{coll or '-'}{host}"
  )


def main(argv):
  del argv
  if FLAGS.config is None:
    sys.exit("benchmarks.aot: --config is required (e.g. configs/coco_stuff27.py)")
  print(f"{FLAGS.topology}, model.dtype={FLAGS.config.model.dtype}\n{_HEADER}", flush=True)
  try:
    result = report(FLAGS.config, FLAGS.topology, FLAGS.steps, FLAGS.breakdown, FLAGS.hlo_dir)
  except (ValueError, MemoryError) as error:  # a batch that does not split, a step too big
    sys.exit(f"benchmarks.aot: {error}")
  print(
      f"COCO-Stuff epoch ({COCO_TRAIN_IMAGES} train + {COCO_VAL_IMAGES} val images): "
      f"{result['coco_epoch_bound_s']:.1f} s roofline bound on {result['chips']} chips "
      + (f"for the steps {FLAGS.steps} only " if FLAGS.steps else "")
      + f"({result['note']})"
  )
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")  # the host computes nothing; libtpu only compiles
  _define_flags()
  app.run(main)
