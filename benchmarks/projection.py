"""The COCO-Stuff epoch projected from measured per-batch times and the recipe's counts.

PHASES is the one place that says how an epoch is built: for each implementation and phase,
the measured row whose per-batch time it costs, how many passes over its images the phase
makes, and which images. When the code's phase structure changes (one cluster pass for both
views, labels cached by the label pass), change the row and the passes here.
"""

COCO_IMAGES = {"train": 49_629, "val": 2_175}  # curated COCO-Stuff-27 (IIC) split
REFERENCE_V100_MINUTES = {
    "epoch": 93,
    "cluster": 36,
    "label": 29,
    "source": "official PiCIE on one V100, as reported in issue 7",
}

_TORCH_PHASES = {
    "cluster": {
        "row": "cluster_step",
        "passes": 1,
        "images": "train",
        "note": "one pass, both views' features and k-means updates per batch",
    },
    "label": {
        "row": "label_step",
        "passes": 1,
        "images": "train",
        "note": "one pass, both views' labels, kept for the train pass",
    },
    "train": {"row": "train_step", "passes": 1, "images": "train", "note": "labels given"},
    "eval": {"row": "eval_step", "passes": 1, "images": "val", "note": "inference"},
}
PHASES = {
    "picie_jax": {
        "cluster": {
            "row": "picie_jax/cluster_step",
            "passes": 1,
            "images": "train",
            "note": "train.cluster_phase: one pass, both views",
        },
        "label": {
            "row": "picie_jax/label_step",
            "passes": 1,
            "images": "train",
            "note": "train.label_phase: both views' counts and the label cache",
        },
        "train": {
            "row": "picie_jax/train_step",
            "passes": 1,
            "images": "train",
            "note": "steps.train_step with the cached labels",
        },
        "eval": {
            "row": "picie_jax/eval_step",
            "passes": 1,
            "images": "val",
            "note": "steps.eval_step",
        },
    },
    **{
        f"torch_{layout}": {
            phase: {**p, "row": f"torch_{layout}/{p['row']}"} for phase, p in _TORCH_PHASES.items()
        }
        for layout in ("nchw", "channels_last")
    },
}


def project(rows, images=None, phases=None):
  """{implementation: {phase: minutes, ..., 'epoch': minutes}} from `rows` ({name: {
  'median_s', 'batch_size'}}); implementations with a missing row are left out and named
  under 'missing'."""
  images = COCO_IMAGES if images is None else images
  phases = PHASES if phases is None else phases
  out, missing = {}, {}
  for impl, impl_phases in phases.items():
    absent = [
        p["row"] for p in impl_phases.values() if rows.get(p["row"], {}).get("median_s") is None
    ]
    if absent:
      missing[impl] = absent
      continue
    minutes = {}
    for phase, p in impl_phases.items():
      row = rows[p["row"]]
      seconds_per_image = row["median_s"] / row["batch_size"]
      minutes[phase] = p["passes"] * images[p["images"]] * seconds_per_image / 60
    minutes["epoch"] = sum(minutes.values())
    out[impl] = minutes
  return {
      "minutes": out,
      "missing": missing,
      "phases": phases,
      "images": images,
      "reference_v100_minutes": REFERENCE_V100_MINUTES,
  }


def input_minutes(images_per_s, phases=None, images=None):
  """Minutes the input pipeline alone needs for picie_jax's passes over the data (it overlaps
  with compute when cores are free; on a saturated CPU it adds to it)."""
  images = COCO_IMAGES if images is None else images
  phases = (PHASES if phases is None else phases)["picie_jax"]
  return sum(p["passes"] * images[p["images"]] for p in phases.values()) / images_per_s / 60
