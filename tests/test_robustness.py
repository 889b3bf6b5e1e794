"""Failures a cluster or a user throws at a run: full disk, locked workdir, strict JSON,
TensorBoard on disk, one-line errors (the signal and resume tests are in test_train.py, real
full disks, stops and path errors in test_faults.py)."""

import errno
import json
import os
import socket
import subprocess

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from picie_jax import config_check
from picie_jax import main
from picie_jax import preemption
from picie_jax import reporting
from picie_jax import train
from picie_jax import workdir_lock


def _disk_full(*args, **kwargs):
  """An OSError(ENOSPC) wrapped in another exception, as Python libraries re-raise it (the real
  full disks, and tensorstore's form of it, are produced in test_faults.py)."""
  try:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/tree/d/0.tmp")
  except OSError as e:
    raise ValueError("Error writing the checkpoint") from e


def test_a_failing_run_releases_its_workdir_lock(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(train, "_resume_point", _disk_full)
  with pytest.raises(ValueError):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_full_disk_is_found_through_wrapping_and_messages():
  with pytest.raises(ValueError) as e:
    _disk_full()
  assert reporting.no_space_error(e.value).filename == "/ckpt/tree/d/0.tmp"
  assert main._one_line(e.value)[0].startswith(  # pylint: disable=protected-access
      "error: No space left on device while writing /ckpt/tree/d/0.tmp;"
  )
  tensorstore = ValueError("RESOURCE_EXHAUSTED: Error writing ...: [os_error_code='28']")
  assert reporting.no_space_error(RuntimeError("commit failed")) is None
  assert reporting.no_space_error(tensorstore) is tensorstore
  device_memory = ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")
  assert reporting.no_space_error(device_memory) is None


def test_json_outputs_are_strict(tmp_path):
  path = tmp_path / "final.json"
  reporting.write_json(
      str(path),
      {
          "miou": float("nan"),
          "per_class": [1.5, np.float32(np.inf)],
          "nested": {"acc": np.float64(-np.inf), "k": np.int64(3)},
      },
  )

  def refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")

  got = json.loads(path.read_text(), parse_constant=refuse)
  assert got == {"miou": None, "per_class": [1.5, None], "nested": {"acc": None, "k": 3}}


def _event_scalars(tb_dir):
  """{(tag, step): value} of every scalar in the events files, read by TensorFlow's reader."""
  scalars = {}
  for name in os.listdir(tb_dir):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(tb_dir, name)):
      for value in event.summary.value:
        scalars[value.tag, event.step] = value.simple_value
  return scalars


def test_tensorboard_is_on_disk_at_each_record_and_rewritten_on_resume(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path), enabled=True)
  for epoch in range(3):
    writer.write(
        {"epoch": epoch, "step": 10 * epoch, "acc": epoch + 0.5, "miou": float("nan")}, 10 * epoch
    )
    # Read while the writer is open, as after a kill right after the record.
    assert _event_scalars(tmp_path / "tensorboard") == {
        ("acc", 10 * e): e + 0.5 for e in range(epoch + 1)
    }
  writer.close()
  resumed = reporting.MetricWriter(str(tmp_path), enabled=True)
  resumed.drop_from_epoch(1)
  assert _event_scalars(tmp_path / "tensorboard") == {("acc", 0): 0.5}
  resumed.write({"epoch": 1, "step": 10, "acc": 7.0}, 10)
  resumed.close()
  assert _event_scalars(tmp_path / "tensorboard") == {("acc", 0): 0.5, ("acc", 10): 7.0}
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [
      {"epoch": 0, "step": 0, "acc": 0.5, "miou": None},
      {"epoch": 1, "step": 10, "acc": 7.0},
  ]


def _write_lock(workdir, host, pid):
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump({"host": host, "pid": pid}, f)


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
  host = socket.gethostname()
  _write_lock(tmp_path, host, os.getppid())  # a live process that is not us
  with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {os.getppid()} on host {host}"):
    workdir_lock.acquire(str(tmp_path))
  _write_lock(tmp_path, "another-host", 1)  # cannot be checked from here: refused
  with pytest.raises(workdir_lock.WorkdirLocked, match="another-host"):
    workdir_lock.acquire(str(tmp_path))

  dead = subprocess.Popen(["true"])
  dead.wait()
  _write_lock(tmp_path, host, dead.pid)
  with workdir_lock.hold(str(tmp_path)):
    assert "taking over the stale lock" in capsys.readouterr().out
    with open(tmp_path / workdir_lock.LOCK_FILE) as f:
      assert json.load(f) == {"host": host, "pid": os.getpid()}
    with pytest.raises(workdir_lock.WorkdirLocked):  # a second run of this process
      workdir_lock.acquire(str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_train_refuses_a_locked_workdir_at_once(tiny_config, tmp_path):
  _write_lock(tmp_path, socket.gethostname(), os.getppid())
  with pytest.raises(workdir_lock.WorkdirLocked) as e:
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert main._one_line(e.value)[0].startswith(  # pylint: disable=protected-access
      f"error: {tmp_path}/train.lock: another picie-jax train (pid {os.getppid()}"
  )
  assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_FILE]  # nothing written


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tiny_config):
  tiny_config.kmeans.metric = "cos"
  with pytest.raises(ValueError) as ours:
    config_check.validate(tiny_config)
  assert main._one_line(ours.value) == (  # pylint: disable=protected-access
      f"error: {ours.value}",
      1,
  )
  with pytest.raises(ValueError) as library:
    np.zeros(-1)
  assert main._one_line(library.value) is None  # pylint: disable=protected-access
  stopped = preemption.Stopped("stopped by SIGINT at epoch 0 batch 1: saved x", 2)
  assert main._one_line(stopped)[1] == 130  # pylint: disable=protected-access


def test_cli_prints_a_user_error_in_one_line_and_its_traceback_under_verbose(tmp_path, capsys):
  """main.main in this process (flags parsed as app.run would): an `eval` of a non-run."""
  try:
    for verbose in ([], ["--verbose"]):
      argv = flags.FLAGS(["picie-jax", "eval", f"--workdir={tmp_path}", *verbose])
      with pytest.raises(SystemExit) as e:
        main.main(argv)
      assert e.value.code == 1
      stderr = capsys.readouterr().err
      assert stderr.strip().splitlines()[-1] == (
          f"picie-jax: error: {tmp_path}/config.json is missing: is {tmp_path} a picie-jax "
          "run directory?"
      )
      assert ("Traceback" in stderr) == bool(verbose)
  finally:
    flags.FLAGS.unparse_flags()
