"""Test-wide settings (CPU, quiet TF, a compilation cache) and the tiny end-to-end config the
loop tests share."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests (and their subprocesses, which inherit this) compile the same tiny train step:
# JAX's persistent cache compiles each once per machine instead of once per test.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "picie_jax_test_compilation_cache"),
)

import pytest  # pylint: disable=g-import-not-at-top

# Modules that take minutes run first, so the two xdist workers (pytest.ini) finish together.
_SLOW_MODULES = ("test_multidevice.py", "test_study.py", "test_train.py", "test_convert.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _SLOW_MODULES.index(name) if name in _SLOW_MODULES else len(_SLOW_MODULES)

  items.sort(key=rank)  # stable: the order inside a module is kept


# --config.* overrides shrinking configs/synthetic.py to a run of a few seconds per epoch.
TINY_OVERRIDES = {
    "dataset.num_train": 48,
    "dataset.num_val": 16,
    "dataset.synthetic_size": 64,
    "model.backbone": "resnet18",
    "model.init": "random",
    "model.width": 8,
    "model.fpn_channels": 16,
    "res2": 64,
    "res1": 32,
    "eval.res": 32,
    "num_epochs": 2,
    "kmeans.batch_size": 16,
    "kmeans.num_init_batches": 2,
    "kmeans.iters": 5,
    "train.batch_size": 16,
    "eval.batch_size": 16,
    "eval.num_vis": 4,
    "checkpoint_every_steps": 1,
    "progress": False,
}


@pytest.fixture
def tiny_config():
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config()
  config.update_from_flattened_dict(TINY_OVERRIDES)
  return config
