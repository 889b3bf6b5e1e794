"""What a person reads during and after a run: progress bars, metrics.jsonl, TensorBoard, JSON."""

import contextlib
import errno
import glob
import json
import math
import os
import time

import jax
import numpy as np
from tensorboardX import event_file_writer
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2
import tqdm

METRICS_FILE = "metrics.jsonl"


def is_main_process():
  return jax.process_index() == 0


class UserError(Exception):
  """A failure the user can fix (a full disk, a locked workdir): one line, no traceback."""


class DiskFull(UserError):
  """No space left on the device while writing `what`; the run resumes once space is freed."""

  def __init__(self, what):
    super().__init__(
        f"No space left on device while writing {what}; free space and rerun the "
        "same command to resume"
    )


def no_space_error(exc):
  """The ENOSPC error in `exc`'s __cause__/__context__ chain (libraries wrap it), or None."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(
        exc
    ):
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


@contextlib.contextmanager
def writing(what):
  """Turns a full disk while writing `what` into one DiskFull line."""
  try:
    yield
  except Exception as e:
    if no_space_error(e) is None:
      raise
    raise DiskFull(what) from e


def recorded_epochs(workdir):
  """The epochs that have a row in workdir/metrics.jsonl."""
  return {r["epoch"] for r in _read_records(os.path.join(workdir, METRICS_FILE))}


def _read_records(path):
  """The rows of a metrics file; a torn last line (a kill or full disk mid-write) is dropped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for number, line in enumerate(lines, start=1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise ValueError(f"{path}:{number} is not JSON; repair or delete that line") from None
  return records


class MetricWriter:
  """Appends one JSON line per record to workdir/metrics.jsonl and mirrors its scalars to
  TensorBoard, both on disk when `write` returns (a kill right after an epoch keeps its row)."""

  def __init__(self, workdir, enabled=None):
    self.enabled = is_main_process() if enabled is None else enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb_dir = os.path.join(workdir, "tensorboard")
    self._events = None

  def drop_from_epoch(self, epoch):
    """Forgets records of `epoch` and later (a resumed run writes them again), in
    metrics.jsonl and TensorBoard: the events are rewritten from the rows that stay."""
    if not self.enabled:
      return
    kept = [r for r in _read_records(self.path) if r.get("epoch", -1) < epoch]
    with writing(self.path):
      with open(self.path + ".tmp", "w") as f:
        f.writelines(_strict_json(r) + "\n" for r in kept)
      os.replace(self.path + ".tmp", self.path)
    self._close_events()
    for path in glob.glob(os.path.join(self._tb_dir, "events.out.tfevents.*")):
      os.remove(path)
    for record in kept:
      self._write_events(record, record["step"])

  def write(self, record, step):
    if not self.enabled:
      return
    line = _strict_json(record) + "\n"
    with writing(self.path):
      with open(self.path, "a") as f:
        f.write(line)
    self._write_events(json.loads(line), step)

  def _write_events(self, record, step):
    """Scalars written and fsynced here: tensorboardX's SummaryWriter queues events for a
    thread that flushes every 2 minutes, so its flush() can leave an epoch's scalars unwritten."""
    with writing(f"TensorBoard events in {self._tb_dir}"):
      if self._events is None:
        os.makedirs(self._tb_dir, exist_ok=True)
        self._events = event_file_writer.EventsWriter(os.path.join(self._tb_dir, "events"))
      for key, value in record.items():
        if isinstance(value, (int, float)) and key not in ("epoch", "step"):
          self._events.write_event(
              event_pb2.Event(
                  wall_time=time.time(),
                  step=int(step),
                  summary=tb_summary.scalar(key, float(value)),
              )
          )
      self._events.flush()

  def _close_events(self):
    if self._events is not None:
      self._events.close()
      self._events = None

  def close(self):
    self._close_events()


def _finite_or_none(obj):
  """The same tree with NaN/inf as None (JSON has no NaN) and numpy values as Python ones."""
  if isinstance(obj, (np.generic, np.ndarray)):
    obj = obj.tolist()
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(v) for v in obj]
  return obj


def _strict_json(obj, **kwargs):
  return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def write_json(path, obj):
  """Writes strict JSON (NaN and inf as null) on process 0."""
  if is_main_process():
    text = _strict_json(obj, indent=2)
    with writing(path):
      with open(path, "w") as f:
        f.write(text)


def say(message):
  """A line for the person watching (process 0 only), printed above any progress bar."""
  if is_main_process():
    tqdm.tqdm.write(message)


class Progress:
  """A tqdm bar for one phase that also reports images/s and the latest loss."""

  def __init__(self, desc, total, batch_size, enabled=True, initial=0):
    """`initial` batches count as done (a resumed phase) but not towards images/s."""
    self._bar = tqdm.tqdm(
        total=total,
        desc=desc,
        unit="batch",
        leave=False,
        initial=initial,
        disable=not (enabled and is_main_process()),
        dynamic_ncols=True,
    )
    self._batch_size = batch_size
    self._start = time.perf_counter()
    self._done = 0

  def update(self, n=1, **postfix):
    self._done += n
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    postfix["img/s"] = f"{self._done * self._batch_size / elapsed:.1f}"
    self._bar.set_postfix(
        {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False
    )
    self._bar.update(n)

  def images_per_second(self):
    return self._done * self._batch_size / max(time.perf_counter() - self._start, 1e-9)

  def close(self):
    self._bar.close()
