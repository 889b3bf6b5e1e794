"""One `train` per workdir: a lock file holding the holder's host and PID (process 0 only).

Two runs writing one workdir crash one of them inside orbax and leave duplicate rows in
metrics.jsonl. The lock is created atomically (a hard link of a complete file), so a reader
never sees it half written; a lock left by a dead process of this host is taken over.
"""

import contextlib
import json
import os
import socket

from picie_jax import reporting

LOCK_FILE = "train.lock"


class WorkdirLocked(reporting.UserError):
  """Another live run holds the workdir."""


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _read(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def acquire(workdir):
  """Creates workdir/train.lock for this process; returns its path."""
  path = os.path.join(workdir, LOCK_FILE)
  me = {"host": socket.gethostname(), "pid": os.getpid()}
  draft = f"{path}.{me['host']}.{me['pid']}"
  with reporting.writing(draft):
    with open(draft, "w") as f:
      json.dump(me, f)
  try:
    while True:
      try:
        os.link(draft, path)
        return path
      except FileExistsError:
        holder = _read(path)
      if holder is None:
        continue  # released in between
      if holder.get("host") != me["host"] or _alive(holder.get("pid", -1)):
        raise WorkdirLocked(
            f"{path}: another picie-jax train (pid {holder.get('pid')} on host "
            f"{holder.get('host')}) is using {workdir}; wait for it to end or use another "
            "--workdir (if that run is gone, delete the lock file)"
        )
      reporting.say(
          f"taking over the stale lock {path} of pid {holder.get('pid')} "
          f"(no such process on {me['host']})"
      )
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
  finally:
    os.remove(draft)


def release(path):
  """Removes the lock if this process holds it."""
  holder = _read(path)
  if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    os.remove(path)


@contextlib.contextmanager
def hold(workdir):
  """Holds the workdir's lock for the block (process 0; the others yield None); yields a
  function that releases it early (for exits that skip `finally`)."""
  if not reporting.is_main_process():
    yield lambda: None
    return
  path = acquire(workdir)
  try:
    yield lambda: release(path)
  finally:
    release(path)
