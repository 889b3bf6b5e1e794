"""Orbax checkpoints of the training state, with fallback past corrupt latest checkpoints."""

import logging
import os
import time

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from picie_jax import preemption
from picie_jax import reporting

CORRUPT_DIR = "corrupt_checkpoints"


class UnreadableCheckpoints(reporting.UserError):
  """Every checkpoint of a run fails to restore: resuming would silently start afresh."""


class _Manager(ocp.CheckpointManager):
  """Orbax's manager without its own preemption check: that check calls JAX's preemption sync
  point with our save counter, which breaks the sequence of ids preemption.requested() gives
  it (the agreed step is then never reached). preemption.py decides when to save instead."""

  def reached_preemption(self, step):
    return False


class Checkpointer:
  """Saves {'state', 'targets'} pytrees plus a JSON `meta` dict (epoch, position in the epoch).

  Steps are save counters, not train steps: several saves can share a train step (after the
  label phase and at the end of an epoch). Orbax writes into a temporary directory and renames
  it when complete, so a run killed while saving leaves no half checkpoint behind.
  """

  def __init__(self, directory, max_to_keep=2):
    self._manager = _Manager(
        os.path.abspath(directory),  # orbax rejects relative paths
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        ),
        item_names=("tree", "meta"),
    )

  def save(self, tree, meta):
    step = (self._manager.latest_step() or 0) + 1
    directory = str(self._manager.directory)
    size = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))
    with reporting.writing(f"checkpoint {step} in {directory}", directory, size):
      self._manager.save(
          step,
          args=ocp.args.Composite(tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
      )
      self._manager.wait_until_finished()
    preemption.checkpoint_saved()
    return step

  def latest_path(self):
    step = self._manager.latest_step()
    return None if step is None else str(self._manager.directory / str(step))

  def restore_latest(self, target_tree):
    """(tree, meta) of the newest checkpoint that restores, or None when there is none.

    A checkpoint that fails to restore is reported with a warning and the previous one is tried;
    once one restores, the unreadable newer ones are moved to ../corrupt_checkpoints, so that
    latest_path() names the one restored and the next save's garbage collection (which keeps
    the newest max_to_keep) cannot delete it while keeping them. When none restores, raises
    UnreadableCheckpoints and moves nothing.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
    unreadable = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                tree=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
      except Exception as e:  # pylint: disable=broad-except
        logging.warning(
            "checkpoint %s/%s is unreadable (%s: %s); trying the previous one",
            self._manager.directory,
            step,
            type(e).__name__,
            e,
        )
        unreadable.append(step)
        continue
      if unreadable:
        self._move_aside(unreadable)
      return restored["tree"], dict(restored["meta"])
    if unreadable:
      raise UnreadableCheckpoints(
          f"no checkpoint in {self._manager.directory} is readable (steps {unreadable}; the "
          "warnings above say why); the run cannot resume. Move them away to start it afresh, "
          "or use a new --workdir"
      )
    return None

  def _move_aside(self, steps):
    directory = self._manager.directory
    aside = os.path.join(os.path.dirname(str(directory)), CORRUPT_DIR)
    if reporting.is_main_process():
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(str(directory / str(step)), target)
        reporting.say(f"moved the unreadable checkpoint {directory / str(step)} to {target}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("moved unreadable checkpoints aside")
    self._manager.reload()

  def close(self):
    self._manager.close()
