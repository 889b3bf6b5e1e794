"""What a person reads during and after a run: progress bars, metrics.jsonl, TensorBoard, JSON."""
import json
import math
import os
import time

import jax
import numpy as np
import tensorboardX
import tqdm


def is_main_process():
  return jax.process_index() == 0


class MetricWriter:
  """Appends one JSON line per record to workdir/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir, enabled=None):
    self.enabled = is_main_process() if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def drop_from_epoch(self, epoch):
    """Forgets records of `epoch` and later (a resumed run writes them again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    with open(self.path, "w") as f:
      for r in records:
        if r.get("epoch", -1) < epoch:
          f.write(json.dumps(r) + "\n")

  def write(self, record, step):
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if isinstance(value, (int, float)) and key not in ("epoch", "step") and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _plain(v):
  if isinstance(v, (np.generic, np.ndarray)):
    return v.tolist()
  return v


def write_json(path, obj):
  if is_main_process():
    with open(path, "w") as f:
      json.dump(obj, f, indent=2, default=_plain)


def say(message):
  """A line for the person watching (process 0 only), printed above any progress bar."""
  if is_main_process():
    tqdm.tqdm.write(message)


class Progress:
  """A tqdm bar for one phase that also reports images/s and the latest loss."""

  def __init__(self, desc, total, batch_size, enabled=True, initial=0):
    """`initial` batches count as done (a resumed phase) but not towards images/s."""
    self._bar = tqdm.tqdm(total=total, desc=desc, unit="batch", leave=False, initial=initial,
                          disable=not (enabled and is_main_process()), dynamic_ncols=True)
    self._batch_size = batch_size
    self._start = time.perf_counter()
    self._done = 0

  def update(self, n=1, **postfix):
    self._done += n
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    postfix["img/s"] = f"{self._done * self._batch_size / elapsed:.1f}"
    self._bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v)
                           for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def images_per_second(self):
    return self._done * self._batch_size / max(time.perf_counter() - self._start, 1e-9)

  def close(self):
    self._bar.close()
