"""Stopping `train` cleanly on SIGTERM/SIGINT: finish the step, save, exit 128 + signal number.

Our handler only sets a flag (a KeyboardInterrupt raised in the middle of a TensorFlow
`__del__` is swallowed as "Exception ignored" and the run goes on); the loops call `requested()`
at each batch boundary and raise `Stopped` there. A second signal exits at once.

Every process of a multi-process run must stop at the same boundary. When JAX's preemption sync
manager runs (jax.distributed initialised, jax_enable_preemption_service on, the default), it
owns SIGTERM: the platform's notice reaches every process and `requested()` asks it, at every
boundary, whether the agreed one is reached (orbax's `CheckpointManager.reached_preemption` is the
same call); our SIGINT handler sends this process a SIGTERM to take that path. A second SIGTERM
is then ignored by JAX (a second SIGINT still exits at once). Without the sync manager,
processes agree on their flags with an all-gather every `AGREE_EVERY` boundaries.
"""

import contextlib
import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np

AGREE_EVERY = 16


class Stopped(Exception):
  """Raised at a batch boundary after a stop signal; `exit_code` is 128 + the signal number."""

  def __init__(self, message, signum):
    super().__init__(message)
    self.exit_code = 128 + signum


class _Status:
  signum = None  # the first signal received
  boundaries = 0  # calls of requested(): the same sequence on every process
  mode = None  # 'flag' | 'sync' | 'allgather' while handlers are installed
  on_hard_exit = None


_status = _Status()


def _write_stderr(line):
  """os.write, not print: a handler that prints while the main thread prints raises."""
  os.write(sys.stderr.fileno(), (line + "\n").encode())


def _handler(signum, frame):  # pylint: disable=unused-argument
  name = signal.Signals(signum).name
  if _status.signum is not None:
    _write_stderr(f"picie-jax: second {name}: exiting now, without saving")
    if _status.on_hard_exit is not None:
      _status.on_hard_exit()
    os._exit(128 + signum)  # pylint: disable=protected-access
  _status.signum = signum
  _write_stderr(
      f"picie-jax: {name}: stopping after the current step (send it again to exit " "at once)"
  )
  if _status.mode == "sync" and signum != signal.SIGTERM:
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's sync manager tells every process


def _mode():
  if jax.distributed.is_initialized():
    try:
      multihost_utils.reached_preemption_sync_point(0)
      return "sync"
    except RuntimeError:  # the preemption service is disabled
      pass
  return "flag" if jax.process_count() == 1 else "allgather"


@contextlib.contextmanager
def handle_signals(on_hard_exit=None):
  """Our SIGINT/SIGTERM handlers for the duration of the block (a no-op off the main thread,
  where Python cannot install them); `on_hard_exit()` runs before a second signal's exit."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _status.signum, _status.boundaries, _status.on_hard_exit = None, 0, on_hard_exit
  _status.mode = _mode()
  signums = [signal.SIGINT] if _status.mode == "sync" else [signal.SIGINT, signal.SIGTERM]
  previous = {s: signal.signal(s, _handler) for s in signums}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _status.mode = _status.on_hard_exit = None


def requested():
  """True at the batch boundary where the run is to stop: the same one on every process.

  Call it at every boundary of every process (it counts them), and act on a True: in the sync
  mode the agreed boundary answers True only once.
  """
  if _status.mode is None:
    return False
  _status.boundaries += 1
  if _status.mode == "flag":
    return _status.signum is not None
  if _status.mode == "sync":
    return multihost_utils.reached_preemption_sync_point(_status.boundaries)
  if _status.boundaries % AGREE_EVERY:
    return False
  flags = multihost_utils.process_allgather(np.int32(_status.signum is not None))
  return bool(np.any(flags))


def stopped(message):
  """The Stopped exception for the signal received ("stopped by SIGTERM <message>")."""
  signum = _status.signum or signal.SIGTERM  # none of ours: JAX's handler took the SIGTERM
  return Stopped(f"stopped by {signal.Signals(signum).name} {message}", signum)


def stop_if_requested(phase, epoch):
  """For phases with no resume point inside them (cluster, label): stops at a requested
  boundary without saving; a rerun restarts the phase from the last checkpoint."""
  if requested():
    raise stopped(
        f"in the {phase} phase of epoch {epoch}, which has no resume point: a rerun "
        "restarts that phase from the last checkpoint"
    )
