"""What a person reads during and after a run: progress bars, metrics.jsonl, TensorBoard, JSON."""

import contextlib
import errno
import glob
import json
import logging
import math
import os
import shutil
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

  def __init__(self, what, free_bytes=None):
    free = "" if free_bytes is None else f" ({free_bytes / 2**20:.1f} MiB free there)"
    super().__init__(
        f"No space left on device while writing {what}{free}; free space and rerun the "
        "same command to resume"
    )


# How a full disk reads: an OSError's errno, or its text where a library (tensorstore under
# orbax) re-raises it as a ValueError('RESOURCE_EXHAUSTED: ... [os_error_code=\'28\']').
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXTS = (
    *(os.strerror(e) for e in _NO_SPACE_ERRNOS),
    *(f"os_error_code='{e}'" for e in _NO_SPACE_ERRNOS),
)
# A save that fails with less free space than this (or than it was writing) ran out of space.
MIN_FREE_BYTES = 1 << 20


def exception_chain(exc):
  """`exc` and the exceptions of its __cause__/__context__ chain."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def no_space_error(exc):
  """The no-space error in `exc`'s __cause__/__context__ chain (libraries wrap it), or None."""
  for e in exception_chain(exc):
    if (isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS) or _says_no_space(str(e)):
      return e
  return None


def _another_os_error(exc):
  """Whether `exc`'s chain holds an OSError that names a cause other than space (EROFS...)."""
  return any(
      isinstance(e, OSError) and e.errno is not None and e.errno not in _NO_SPACE_ERRNOS
      for e in exception_chain(exc)
  )


def _says_no_space(text):
  return any(words in text for words in _NO_SPACE_TEXTS)


def free_bytes(path):
  """Bytes free to this user on the file system that holds (or would hold) `path`."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


class _DropDiskFullLogs(logging.Filter):
  """Drops log records of a full disk. Orbax logs each failing write thread's traceback before
  the save raises, and asyncio one "Future exception was never retrieved" per array when the
  save's futures are collected, later: a thousand lines for a real model, where writing()
  says it in one."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return no_space_error(exc) is None and not _says_no_space(record.getMessage())


_DROP_DISK_FULL_LOGS = _DropDiskFullLogs()
_QUIETED_LOGGERS = ("absl", "asyncio")


@contextlib.contextmanager
def writing(what, path=None, needed_bytes=MIN_FREE_BYTES):
  """Turns a full disk while writing `what` (to `path`, by default `what` itself) into one
  DiskFull line: an error that says so, or any error while fewer than `needed_bytes` are free.
  After a full disk, the libraries' own reports of it stay silenced."""
  path = what if path is None else path
  for name in _QUIETED_LOGGERS:
    logging.getLogger(name).addFilter(_DROP_DISK_FULL_LOGS)
  try:
    yield
  except Exception as e:
    free = free_bytes(path)
    if no_space_error(e) is not None or (
        free < max(needed_bytes, MIN_FREE_BYTES) and not _another_os_error(e)
    ):
      raise DiskFull(what, free) from e
    raise
  for name in _QUIETED_LOGGERS:
    logging.getLogger(name).removeFilter(_DROP_DISK_FULL_LOGS)


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
    with writing(f"TensorBoard events in {self._tb_dir}", self._tb_dir):
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
