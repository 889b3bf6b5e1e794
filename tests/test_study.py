"""`picie-jax study` end to end (2 seeds x 2 sweep values of a very small run, through the CLI),
its aggregate against numpy on the runs' own final.json, and a second call that trains nothing."""

import copy
import json
import os
import shutil
import subprocess
import sys
import time

from conftest import TINY_OVERRIDES
import numpy as np
from PIL import Image
import pytest

from picie_jax import rundir
from picie_jax import study
from picie_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TINY_OVERRIDES made smaller still: one batch per phase, one epoch, 32 px, K = 4.
STUDY_OVERRIDES = {
    **TINY_OVERRIDES,
    "num_epochs": 1,
    "dataset.num_train": 16,
    "dataset.num_val": 8,
    "dataset.synthetic_size": 32,
    "res2": 32,
    "kmeans.num_init_batches": 1,
    "kmeans.iters": 2,
    "kmeans.k_train": 4,
    "eval.k_test": 4,
    "eval.batch_size": 8,
    "eval.num_vis": 1,
    "model.fpn_channels": 8,
}
SEEDS, LRS = ("1", "2"), ("0.0001", "0.01")
SCORES = ("acc", "miou", "thing_miou", "stuff_miou")


def _config():
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config()
  config.update_from_flattened_dict(STUDY_OVERRIDES)
  config.lock()
  return config


def _get(tree, dotted_key):
  for part in dotted_key.split("."):
    tree = tree[part]
  return np.nan if tree is None else tree


def _strict_json(path):
  with open(path) as f:
    return json.load(f, parse_constant=lambda name: pytest.fail(f"{path} holds {name}"))


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
  """The study run once through the CLI; (workdir, the runs as planned in this process)."""
  workdir = tmp_path_factory.mktemp("study")
  cmd = [
      sys.executable,
      "-m",
      "picie_jax.main",
      "study",
      f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}",
      *[f"--config.{k}={v}" for k, v in STUDY_OVERRIDES.items()],
      f"--seeds={','.join(SEEDS)}",
      f"--sweep=train.lr={','.join(LRS)}",
      f"--workdir={workdir}",
  ]
  # The seed-2 runs reuse the seed-1 runs' compiled programs (init, train step) from JAX's
  # persistent cache: each run builds its own jit wrappers, so the in-memory cache misses them.
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache")}
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, study.plan(_config(), SEEDS, [f"train.lr={','.join(LRS)}"])


def test_study_aggregates_every_run_as_numpy_does(finished_study):
  workdir, runs = finished_study
  summary = _strict_json(workdir / study.STUDY_JSON)
  assert (
      [r["name"] for r in summary["runs"]]
      == [
          "train.lr=0.0001_seed1",
          "train.lr=0.0001_seed2",
          "train.lr=0.01_seed1",
          "train.lr=0.01_seed2",
      ]
      == [r.name for r in runs]
  )
  for record in summary["runs"]:  # the resolved config: seed, sweep value, shared overrides
    assert record["config"]["seed"] == record["seed"]
    assert record["config"]["train"]["lr"] == record["sweep"]["train.lr"]
    assert record["config"]["num_epochs"] == 1 and record["config"]["res2"] == 32
    assert record["metrics"]["wall_s"] > 0
  assert [p["sweep"] for p in summary["points"]] == [{"train.lr": 0.0001}, {"train.lr": 0.01}]
  md = (workdir / study.STUDY_MD).read_text()
  for point, lr in zip(summary["points"], LRS):
    finals = []
    for seed in SEEDS:
      with open(workdir / f"train.lr={lr}_seed{seed}" / "final.json") as f:
        finals.append(json.load(f)["fresh"])
    assert point["n"] == 2
    names = [f"iou_by_name.{name}" for name in finals[0]["iou_by_name"]]
    cells = []  # the table's score columns, as study.md should print them
    for key in SCORES + ("kmeans_init_loss", "kmeans_online_loss", *names):
      values = np.array([_get(final, key) for final in finals], np.float64)
      expected = [values.mean(), values.std(ddof=1)]
      if np.isnan(expected).any():  # NaN in a run (e.g. an absent class): null
        assert point["metrics"][f"fresh.{key}"] == {"mean": None, "std": None}, key
      else:
        stats = point["metrics"][f"fresh.{key}"]
        np.testing.assert_allclose([stats["mean"], stats["std"]], expected, rtol=1e-12)
      if key in SCORES:  # the final scores, which for PiCIE are the fresh clusters'
        assert point["metrics"][f"final.{key}"] == point["metrics"][f"fresh.{key}"], key
        cells.append(f"{expected[0]:.1f} ± {expected[1]:.1f}")
    assert f"| train.lr={lr} | 2 | " + " | ".join(cells) + " | " in md
  png = np.asarray(Image.open(workdir / study.STUDY_PNG).convert("L"))
  assert png.shape[0] > 200 and png.std() > 5  # drawn, not blank


def test_second_call_trains_nothing_and_writes_the_same(finished_study, monkeypatch):
  workdir, runs = finished_study
  before = (workdir / study.STUDY_JSON).read_text()
  monkeypatch.setattr(
      train, "train_and_evaluate", lambda *_: pytest.fail("a finished run was trained again")
  )
  start = time.perf_counter()
  study.run_study(runs, str(workdir))
  assert time.perf_counter() - start < 20
  assert (workdir / study.STUDY_JSON).read_text() == before
  lines = study.run_commands(runs, str(workdir), ["picie-jax", "study", "--list"])
  assert [line.split("\t")[2] for line in lines] == ["done"] * 4
  assert lines[3].endswith("picie-jax study --only=3")


def test_a_run_is_done_only_with_its_config_and_a_later_final_json(finished_study, tmp_path):
  workdir, runs = finished_study
  spec = runs[0]
  run_dir = tmp_path / spec.name
  shutil.copytree(workdir / spec.name, run_dir)
  assert study.is_done(spec.config, str(run_dir))
  display_only = study.plan(_config(), SEEDS, [])[0].config
  display_only.progress, display_only.train.lr = True, spec.config.train.lr
  assert study.is_done(display_only, str(run_dir))
  assert not study.is_done(runs[1].config, str(run_dir))  # another seed
  more_epochs = study.plan(_config(), SEEDS, [])[0].config
  more_epochs.num_epochs = 2  # train continues a finished run when num_epochs is raised
  assert not study.is_done(more_epochs, str(run_dir))
  os.utime(run_dir / "config.json", (time.time() + 10,) * 2)  # a later train call, unfinished
  assert not study.is_done(spec.config, str(run_dir))


def test_a_run_saved_before_a_field_existed_is_the_same_run(finished_study, tmp_path):
  workdir, runs = finished_study
  spec = runs[0]
  run_dir = tmp_path / spec.name
  shutil.copytree(workdir / spec.name, run_dir)
  saved = json.loads((run_dir / "config.json").read_text())
  del saved["eval"]["crf"], saved["model"]["head"]  # as saved by a version without them
  (run_dir / "config.json").write_text(json.dumps(saved))
  os.utime(run_dir / "final.json", (time.time() + 10,) * 2)
  assert study.is_done(spec.config, str(run_dir))
  with_crf = copy.deepcopy(spec.config)
  with_crf.eval.crf = True  # not the default: a different run
  assert rundir.config_changes(with_crf, str(run_dir)) == {"eval.crf": (False, True)}
  assert not study.is_done(with_crf, str(run_dir))


def test_sweep_values_take_the_field_type_and_bad_keys_name_it():
  config = _config()
  runs = study.plan(
      config,
      ["3"],
      [
          "augment.photometric=false,True",
          "kmeans.k_train=4,6",
          "augment.blur_sigma=(0.1,2.0),(0.5,1.0)",
      ],
  )
  assert len(runs) == 8 and runs[0].name == (
      "augment.photometric=False_kmeans.k_train=4_augment.blur_sigma=0.1_2.0_seed3"
  )
  last = runs[-1].config
  assert (last.augment.photometric, last.kmeans.k_train, last.augment.blur_sigma, last.seed) == (
      True,
      6,
      (0.5, 1.0),
      3,
  )
  assert config.seed == 1 and config.kmeans.k_train == 4  # the base config is untouched
  for sweep, message in (
      ("train.lrr=0.1", "config.train.lrr is not a config field"),
      ("train.lr=fast", "'fast' is not a valid float"),
      ("kmeans.k_train=2.5", "'2.5' is not a valid int"),
      ("augment.photometric=maybe", "not a valid bool"),
      ("train=1", "config.train is a group of fields"),
      ("seed=1,2", "--seeds"),
      ("train.lr=1,1.0", "repeated"),
  ):
    with pytest.raises(ValueError, match=message):
      study.plan(config, ["1"], [sweep])
