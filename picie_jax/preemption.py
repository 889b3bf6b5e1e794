"""Stopping `train` cleanly on SIGTERM/SIGINT: finish the step, save, exit 128 + signal number.

Python runs a signal handler only when the main thread executes bytecode, which it does not
while it compiles a step or waits for one: a handler there would answer minutes late. So the
signal is read by a thread of ours (signal.set_wakeup_fd), which acts at once. When no train
step finished since the last checkpoint (the first step after it may still be compiling or
running), there is nothing to save and the run exits at once with the stop message. Otherwise
it sets a flag: the loops call `requested()` at each batch boundary and raise `Stopped` there,
after saving where the phase has a resume point. A second signal exits at once.

Every process of a multi-process run must stop at the same boundary. When JAX's preemption sync
manager runs (jax.distributed initialised, jax_enable_preemption_service on, the default), it
owns SIGTERM: the platform's notice reaches every process and `requested()` asks it, at every
boundary, whether the agreed one is reached (orbax's `CheckpointManager.reached_preemption` is the
same call); our SIGINT sends this process a SIGTERM to take that path. A second SIGTERM
is then ignored by JAX (a second SIGINT still exits at once), and a stop waits for the agreed
boundary even when nothing is left to save. Without the sync manager, processes agree on their
flags with an all-gather every `AGREE_EVERY` boundaries; a process that exits at once leaves the
others to fail at their next collective, so send the signal to every process (as a platform
does).
"""

import contextlib
import os
import shlex
import signal
import socket
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
  unsaved_step = None  # outputs of the first train step dispatched since the last checkpoint


_status = _Status()


def _write_stderr(line):
  """os.write, not print: a line written while the main thread prints raises in print."""
  os.write(sys.stderr.fileno(), (line + "\n").encode())


def resume_line(stop):
  """The line a Stopped ends with: its message and the command that resumes the run."""
  return f"{stop}; resume with: {shlex.join(['picie-jax', *sys.argv[1:]])}"


def checkpoint_saved():
  """Called when a checkpoint is complete on disk: a stop before the next step finishes has
  nothing to save."""
  _status.unsaved_step = None


def step_dispatched(outputs):
  """Called with each train step's outputs (arrays, never donated): while those of the first
  step after the last checkpoint are not ready, a stop has nothing to save."""
  if _status.unsaved_step is None:
    _status.unsaved_step = outputs


def _nothing_to_save():
  step = _status.unsaved_step
  return step is None or not all(leaf.is_ready() for leaf in jax.tree.leaves(step))


def _exit_now(signum, line):
  _write_stderr(line)
  if _status.on_hard_exit is not None:
    _status.on_hard_exit()
  os._exit(128 + signum)  # pylint: disable=protected-access


def _on_signal(signum):
  """What a signal does, run by the watcher thread as soon as the signal arrives."""
  name = signal.Signals(signum).name
  if _status.signum is not None:
    _exit_now(signum, f"picie-jax: second {name}: exiting now, without saving")
  _status.signum = signum
  if _status.mode != "sync" and _nothing_to_save():
    _exit_now(
        signum,
        "picie-jax: "
        + resume_line(
            stopped("before any train step finished since the last checkpoint: nothing to save")
        ),
    )
  _write_stderr(
      f"picie-jax: {name}: stopping after the current step (send it again to exit at once)"
  )
  if _status.mode == "sync" and signum != signal.SIGTERM:
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's sync manager tells every process


def _watch(wakeup, signums):
  """Acts on the numbers of `signums` that Python's C-level handler writes to the wakeup socket
  (it writes those of every signal with a Python handler)."""
  while True:
    try:
      received = wakeup.recv(64)
    except OSError:  # closed when the block ends
      return
    if not received:
      return
    for signum in received:
      if signum in signums and _status.mode is not None:
        _on_signal(signum)


def _ignore(signum, frame):  # pylint: disable=unused-argument
  """The Python-level handler: the watcher thread has acted already."""


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
  """Our SIGINT/SIGTERM handling for the duration of the block (a no-op off the main thread,
  where Python cannot install handlers); `on_hard_exit()` runs before an exit at once."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _status.signum, _status.boundaries, _status.on_hard_exit = None, 0, on_hard_exit
  _status.unsaved_step = None
  _status.mode = _mode()
  signums = [signal.SIGINT] if _status.mode == "sync" else [signal.SIGINT, signal.SIGTERM]
  wakeup, wakeup_writer = socket.socketpair()
  wakeup_writer.setblocking(False)
  watcher = threading.Thread(
      target=_watch, args=(wakeup, signums), name="picie-signals", daemon=True
  )
  watcher.start()
  previous_fd = signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
  previous = {s: signal.signal(s, _ignore) for s in signums}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    signal.set_wakeup_fd(previous_fd)
    _status.mode = _status.on_hard_exit = _status.unsaved_step = None
    wakeup_writer.close()
    wakeup.shutdown(socket.SHUT_RDWR)
    watcher.join()
    wakeup.close()


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
