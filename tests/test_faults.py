"""Faults produced for real: a full file system (a small tmpfs), a stop that arrives while a
slow first step runs, and path errors (a regular file, a read-only mount, another user)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types

from absl import flags
from conftest import TINY_OVERRIDES
import jax.numpy as jnp
import numpy as np
import pytest

from picie_jax import checkpoint
from picie_jax import evaluate
from picie_jax import main
from picie_jax import reporting
from picie_jax import train
from picie_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trains a tiny run twice in a child process, each time with step `n` slowed: that step's loss
# passes a host callback that sends this process SIGTERM, then sleeps `sleep_s` (120 s: as a
# first step that compiles for minutes would keep the run).
_SLOW_STEP_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    import jax, jax.numpy as jnp
    from configs import synthetic
    from picie_jax import main, preemption, steps, train

    overrides, workdir = json.loads(sys.argv[1]), sys.argv[2]
    config = synthetic.get_config()
    config.update_from_flattened_dict(overrides)
    real_train_step = steps.train_step

    def train_with_slow_step(n, sleep_s):
      def sigterm_then_sleep(loss):
        print(f"SIGTERM at {time.time()}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(sleep_s)
        return loss

      slowed = jax.jit(lambda loss: jax.pure_callback(
          sigterm_then_sleep, jax.ShapeDtypeStruct(loss.shape, loss.dtype), loss))
      calls = []
      def train_step(*args, **kwargs):
        state, out = real_train_step(*args, **kwargs)
        calls.append(1)
        return state, ({**out, "total": slowed(out["total"])} if len(calls) == n else out)
      steps.train_step = train_step
      try:
        train.train_and_evaluate(config, workdir)
      except preemption.Stopped as e:
        print("picie-jax: " + main._one_line(e)[0], file=sys.stderr, flush=True)

    train_with_slow_step(2, 1)  # step 1 finished since the last checkpoint: finish and save
    train_with_slow_step(1, 120)  # resumed: the first step is slow, nothing to save: exit now
    raise AssertionError("the second stop did not exit")
""")


def _latest_meta(workdir):
  ckpts = workdir / "checkpoints"
  latest = max(int(s.name) for s in ckpts.iterdir() if s.name.isdigit())
  return json.loads((ckpts / str(latest) / "meta" / "metadata").read_text())


def test_a_stop_during_a_slow_first_step_exits_at_once_and_otherwise_saves(tmp_path):
  """No mid-epoch checkpoints (checkpoint_every_steps > batches): a SIGTERM during step 2 must
  finish the steps dispatched (2, or 3: dispatch runs ahead) and save there; the resumed run's
  SIGTERM during its first step must exit at once, 143, leaving that checkpoint as it was."""
  overrides = {
      **TINY_OVERRIDES,
      "num_epochs": 1,
      "dataset.num_train": 80,  # 5 batches: the resumed run has steps left
      "checkpoint_every_steps": 100,
      "log_every_steps": 1,  # the loop waits for each step: the stop comes in this epoch
  }
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-c", _SLOW_STEP_SCRIPT, json.dumps(overrides), str(workdir)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  ended = time.time()
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  first = next(line for line in lines if line.startswith("picie-jax: stopped by SIGTERM at"))
  saved_batch = _latest_meta(workdir)["next_batch"]
  assert saved_batch in (2, 3)
  assert first.startswith(f"picie-jax: stopped by SIGTERM at epoch 0 batch {saved_batch}: saved ")
  assert "; resume with: picie-jax " in first
  assert lines[-1].startswith(
      "picie-jax: stopped by SIGTERM before any train step finished since the last checkpoint: "
      "nothing to save; resume with: picie-jax"
  ), lines[-1]
  signalled = [float(line.split()[-1]) for line in lines if line.startswith("SIGTERM at")]
  assert len(signalled) == 2
  assert ended - signalled[-1] < 30, f"exited {ended - signalled[-1]:.0f} s after the signal"
  assert not (workdir / "train.lock").exists()


@pytest.fixture
def mount_tmpfs(tmp_path):
  """mount_tmpfs(name, options) -> a tmpfs mounted at tmp_path/name (root only: skips with the
  reason elsewhere); unmounted after the test."""
  mounted = []

  def mount(name, options):
    path = tmp_path / name
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode:
      pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    mounted.append(path)
    return path

  yield mount
  for path in mounted:
    subprocess.run(["umount", "--lazy", str(path)], check=True)


def _remount(path, options):
  subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def _fill(directory):
  """Writes a file until the file system says it is full (ENOSPC); returns its path."""
  filler = directory / "filler"
  with open(filler, "wb", buffering=0) as f:
    with pytest.raises(OSError, match="No space left on device"):
      while True:
        f.write(b"\0" * 4096)
  return filler


def test_a_full_disk_while_checkpointing_is_one_line_and_the_rerun_resumes(
    tiny_config, mount_tmpfs, caplog
):
  """A 4 MB tmpfs holds a checkpoint or two, not three: orbax's write fails (in tensorstore or
  in its metadata writes, by the layout). One line, exit 1, no logged tracebacks; after
  remounting larger the same call resumes from the last checkpoint and finishes."""
  tiny_config.update_from_flattened_dict(
      {"num_epochs": 1, "dataset.num_train": 32, "kmeans.num_init_batches": 1}
  )
  disk = mount_tmpfs("disk", "size=4m")
  workdir = disk / "run"
  with pytest.raises(reporting.DiskFull) as full:
    train.train_and_evaluate(tiny_config, str(workdir))
  line, code = main._one_line(full.value)  # pylint: disable=protected-access
  assert code == 1
  assert re.fullmatch(
      rf"error: No space left on device while writing checkpoint \d+ in {workdir}/checkpoints "
      r"\(\d+\.\d MiB free there\); free space and rerun the same command to resume",
      line,
  ), line
  assert not [r for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]
  assert not (workdir / workdir_lock.LOCK_FILE).exists()

  _remount(disk, "size=64m")
  caplog.clear()
  final = train.train_and_evaluate(tiny_config, str(workdir))
  assert "fresh" in final and (workdir / "final.json").exists()
  assert reporting.recorded_epochs(str(workdir)) == {0}


def test_tensorstores_full_disk_is_recognised_and_not_logged(mount_tmpfs, caplog):
  """An array larger than the disk: tensorstore raises ValueError('RESOURCE_EXHAUSTED: Error
  writing "x/0" in OCDBT database ...: No space left on device [os_error_code='28']'), no
  OSError in the chain, after orbax's threads logged their tracebacks."""
  disk = mount_tmpfs("disk", "size=256k")
  ckpt = checkpoint.Checkpointer(str(disk / "checkpoints"))
  incompressible = np.random.default_rng(0).random(100_000).astype(np.float32)  # 400 kB
  with pytest.raises(reporting.DiskFull) as full:
    ckpt.save({"x": jnp.asarray(incompressible)}, {"epoch": 0})
  cause = full.value.__cause__
  assert type(cause) is ValueError and str(cause).startswith("RESOURCE_EXHAUSTED: Error writing")
  assert not [e for e in reporting.exception_chain(cause) if isinstance(e, OSError)]
  assert str(full.value) == (
      f"No space left on device while writing checkpoint 1 in {disk}/checkpoints (0.2 MiB free "
      "there); free space and rerun the same command to resume"
  )
  assert not [r for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]
  ckpt.close()


def test_full_disk_while_writing_metrics_pictures_and_final_json_is_one_line(mount_tmpfs):
  disk = mount_tmpfs("disk", "size=64k")
  filler = _fill(disk)
  writer = reporting.MetricWriter(str(disk), enabled=True)
  source = types.SimpleNamespace(num_classes=2, class_names=(), thing_classes=())
  writes = {
      f"{disk}/metrics.jsonl": lambda: writer.write({"epoch": 0, "step": 1, "acc": 0.5}, 1),
      f"{disk}/vis/epoch000_*.png": lambda: evaluate._write_pictures(  # pylint: disable=protected-access
          str(disk / "vis" / "epoch000"), {"image": []}, np.arange(2), np.eye(2), source
      ),
      f"{disk}/final.json": lambda: reporting.write_json(str(disk / "final.json"), {"acc": 1}),
  }
  for what, write in writes.items():
    with pytest.raises(reporting.DiskFull) as full:
      write()
    assert main._one_line(full.value) == (  # pylint: disable=protected-access
        f"error: No space left on device while writing {what} (0.0 MiB free there); free "
        "space and rerun the same command to resume",
        1,
    )
  filler.unlink()
  for write in writes.values():
    write()
  writer.close()
  assert reporting.recorded_epochs(str(disk)) == {0}
  assert json.loads((disk / "final.json").read_text()) == {"acc": 1}
  assert (disk / "vis" / "epoch000_confusion.png").exists()


def _cli_error(argv, capsys, as_user=None):
  """Runs main.main in this process (flags parsed as app.run would: the config's overrides are
  read from sys.argv), as `as_user` (a uid) when given; returns (exit code, last stderr line)."""
  argv = ["picie-jax", *argv]
  saved_argv, sys.argv = sys.argv, argv
  defined = set(flags.FLAGS)
  try:
    parsed = flags.FLAGS(argv)
    if as_user is not None:
      os.seteuid(as_user)
    try:
      with pytest.raises(SystemExit) as e:
        main.main(parsed)
    finally:
      if as_user is not None:
        os.seteuid(0)
  finally:
    sys.argv = saved_argv
    for name in set(flags.FLAGS) - defined:  # the --config.* overrides: defined per parse
      delattr(flags.FLAGS, name)
    flags.FLAGS(["picie-jax", f"--config={ROOT}/configs/synthetic.py"])  # forgets the overrides
    flags.FLAGS.unparse_flags()
  return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


_TINY_FLAGS = [
    f"--config={ROOT}/configs/synthetic.py",
    *(f"--config.{key}={value}" for key, value in TINY_OVERRIDES.items()),
]


def test_path_errors_are_one_line_naming_the_argument(tmp_path, mount_tmpfs, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  assert _cli_error(["train", f"--workdir={a_file}/run", *_TINY_FLAGS], capsys) == (
      1,
      f"picie-jax: error: {a_file}/run (--workdir): Not a directory; a part of it is a file, "
      "not a directory: choose another path",
  )
  read_only = mount_tmpfs("read_only", "ro,size=1m")
  assert _cli_error(["train", f"--workdir={read_only}/run", *_TINY_FLAGS], capsys) == (
      1,
      f"picie-jax: error: {read_only}/run (--workdir): Read-only file system; choose a path on "
      "a writable file system",
  )
  for pth_file, reason, hint in (
      (tmp_path / "missing.pth", "No such file or directory", "check the path"),
      (tmp_path / "no_such_dir" / "c.pth", "No such file or directory", "check the path"),
      (tmp_path, "Is a directory", "name a file, not a directory"),
  ):
    assert _cli_error(["convert", f"--workdir={tmp_path}/new", str(pth_file)], capsys) == (
        1,
        f"picie-jax: error: {pth_file} (the convert argument): {reason}; {hint}",
    )


def test_permission_denied_is_one_line(capsys):
  """Root passes permission bits, so the commands run as another user (nobody) when the test
  runs as root: a workdir in a directory it cannot write, a dataset root it cannot read."""
  as_user = 65534 if os.geteuid() == 0 else None
  base = tempfile.mkdtemp()
  try:
    os.chmod(base, 0o755)  # mkdtemp's is 0o700
    os.mkdir(os.path.join(base, "not_writable"), 0o555)
    images = os.path.join(base, "photos", "train", "images")
    os.makedirs(images)
    os.chmod(images, 0o000)
    workdir = os.path.join(base, "not_writable", "run")
    assert _cli_error(["train", f"--workdir={workdir}", *_TINY_FLAGS], capsys, as_user) == (
        1,
        f"picie-jax: error: {workdir} (--workdir): Permission denied; give this user access to "
        "it or choose another path",
    )
    dataset = ["--config.dataset.name=image_folder", f"--config.dataset.root={base}/photos"]
    run = os.path.join(base, "run")
    assert _cli_error(["train", f"--workdir={run}", *_TINY_FLAGS, *dataset], capsys, as_user) == (
        1,
        f"picie-jax: error: {images} (under --config.dataset.root {base}/photos): Permission "
        "denied; give this user access to it or choose another path",
    )
  finally:
    os.chmod(images, 0o755)
    shutil.rmtree(base)
