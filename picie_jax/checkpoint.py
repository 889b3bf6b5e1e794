"""Orbax checkpoints of the training state, with fallback past a corrupt latest checkpoint."""
import logging
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves {'state', 'targets'} pytrees plus a JSON `meta` dict (epoch, position in the epoch).

  Steps are save counters, not train steps: several saves can share a train step (after the
  label phase and at the end of an epoch). Orbax writes into a temporary directory and renames
  it when complete, so a run killed while saving leaves no half checkpoint behind.
  """

  def __init__(self, directory, max_to_keep=2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),  # orbax rejects relative paths
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("tree", "meta"))

  def save(self, tree, meta):
    step = (self._manager.latest_step() or 0) + 1
    self._manager.save(step, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()
    return step

  def latest_path(self):
    step = self._manager.latest_step()
    return None if step is None else str(self._manager.directory / str(step))

  def restore_latest(self, target_tree):
    """(tree, meta) of the newest checkpoint that restores, or None when there is none.

    A checkpoint that fails to restore is reported with a warning and the previous one is tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            tree=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored["tree"], dict(restored["meta"])
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %s/%s is unreadable (%s: %s); trying the previous one",
                        self._manager.directory, step, type(e).__name__, e)
    return None

  def close(self):
    self._manager.close()
