"""launch/*.sh: each script's --dry-run prints the commands it would run (checked here with fake
SLURM / TPU environments), every script passes shellcheck, and the SLURM environment does not
take GPUs away from a process that picie_jax/parallel.py joins to a run."""

import glob
import os
import shlex
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
_SHELLCHECK = os.path.join(os.path.dirname(sys.executable), "shellcheck")
_TRAIN = [
    "train",
    "--config",
    "configs/coco_stuff27.py",
    "--workdir",
    "/shared/runs/a b",
    "--config.num_epochs=2",
]
_SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[003-004,010],cpu1",
    "SLURM_JOB_NUM_NODES": "4",
}


def _dry_run(script, **env):
  """The commands `script --dry-run CONFIG WORKDIR flag` prints, each split as the shell would."""
  clean = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(
          (
              "SLURM_",
              "PICIE_",
              "PROCESS_PER",
              "GPUS_PER_NODE",
              "PORT",
              "TPU",
              "ZONE",
              "PROJECT",
              "REMOTE_DIR",
              "XLA_",
              "JAX_",
          )
      )
  }
  out = subprocess.run(
      [os.path.join(LAUNCH, script), "--dry-run", *_TRAIN[2::2][:2], _TRAIN[-1]],
      env=dict(clean, HOME="/home/u", **env),
      capture_output=True,
      text=True,
      check=True,
      timeout=30,
  )
  return [shlex.split(line) for line in out.stdout.splitlines()]


def test_every_launch_script_is_covered():
  scripts = {os.path.basename(p) for p in glob.glob(os.path.join(LAUNCH, "*.sh"))}
  scripts.discard("dry_run.sh")  # sourced by the others, not a launch script
  assert scripts == {"gpu_single_node.sh", "multi_process_cpu.sh", "tpu_pod.sh", "slurm.sh"}


def test_gpu_single_node_dry_run():
  assert _dry_run("gpu_single_node.sh") == [
      [
          "env",
          "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
          "JAX_PLATFORMS=cuda",
          "JAX_COMPILATION_CACHE_DIR=/home/u/.cache/picie_jax/xla",
          "picie-jax",
          *_TRAIN,
      ]
  ]
  (command,) = _dry_run("gpu_single_node.sh", JAX_COMPILATION_CACHE_DIR="/disk/xla")
  assert "JAX_COMPILATION_CACHE_DIR=/disk/xla" in command


def test_multi_process_cpu_dry_run():
  shared = [
      "JAX_PLATFORMS=cpu",
      "XLA_FLAGS=--xla_force_host_platform_device_count=2",
      "PICIE_COORDINATOR=127.0.0.1:5555",
      "PICIE_NUM_PROCESSES=2",
  ]
  assert _dry_run("multi_process_cpu.sh", PORT="5555", PICIE_JAX="/venv/bin/picie-jax") == [
      ["mkdir", "-p", "/shared/runs/a b"],
      [
          "env",
          *shared,
          "PICIE_PROCESS_ID=1",
          "/venv/bin/picie-jax",
          *_TRAIN,
          ">/shared/runs/a b/process1.log",
          "2>&1",
          "&",
      ],
      ["env", *shared, "PICIE_PROCESS_ID=0", "/venv/bin/picie-jax", *_TRAIN],
  ]


def test_tpu_pod_dry_run():
  (command,) = _dry_run("tpu_pod.sh", TPU="pod-v4-32", ZONE="us-central2-b", PROJECT="p1")
  assert command[:10] == [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "ssh",
      "pod-v4-32",
      "--zone",
      "us-central2-b",
      "--project",
      "p1",
  ]
  assert command[10:12] == ["--worker=all", "--command"] and len(command) == 13
  remote = shlex.split(command[12])
  assert remote[:3] == ["cd", "~/picie_jax", "&&"]  # expanded by the worker's shell
  assert remote[3:] == [
      "PICIE_DISTRIBUTED=1",
      "JAX_COMPILATION_CACHE_DIR=~/.cache/picie_jax/xla",  # expanded by the worker's shell
      ".venv/bin/picie-jax",
      *_TRAIN,
  ]
  (command,) = _dry_run("tpu_pod.sh", TPU="t", ZONE="z", JAX_COMPILATION_CACHE_DIR="/disk/my xla")
  assert "JAX_COMPILATION_CACHE_DIR=/disk/my xla" in shlex.split(command[-1])


def _slurm_task_env(command, **task_env):
  """Runs the per-task part of an srun command (bash -c ...) as SLURM would start a task, with
  picie-jax replaced by a printout of the variables the task exports."""
  start = command.index("bash")
  wrapper = command[start : start + 4]
  assert wrapper[:2] == ["bash", "-c"] and command[start + 4 : start + 6] == ["picie-jax", "train"]
  printout = ["sh", "-c", 'echo "$PICIE_PROCESS_ID ${JAX_LOCAL_DEVICE_IDS:-all}"']
  out = subprocess.run(
      [*wrapper, *printout],
      env=dict(os.environ, **task_env),
      capture_output=True,
      text=True,
      check=True,
      timeout=30,
  )
  return out.stdout.split()


def test_slurm_dry_run_one_process_per_node():
  (command,) = _dry_run("slurm.sh", **_SLURM)
  start = command.index("bash")
  assert command[:start] == [
      "srun",
      "--nodes=4",
      "--ntasks=4",
      "--ntasks-per-node=1",
      "--kill-on-bad-exit=1",
      "env",
      "PICIE_COORDINATOR=gpu003:61586",  # 61440 + 4242 % 4096, on the job's first node
      "PICIE_NUM_PROCESSES=4",
      "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
      "JAX_PLATFORMS=cuda",
      "JAX_COMPILATION_CACHE_DIR=/home/u/.cache/picie_jax/xla",
  ]
  assert command[start + 4 :] == ["picie-jax", *_TRAIN]
  assert _slurm_task_env(command, SLURM_PROCID="3", SLURM_LOCALID="0") == ["3", "all"]


def test_slurm_dry_run_one_process_per_gpu():
  (command,) = _dry_run(
      "slurm.sh",
      **dict(
          _SLURM,
          SLURM_JOB_NODELIST="nodeA,nodeB",
          SLURM_JOB_NUM_NODES="2",
          SLURM_GPUS_ON_NODE="8",
          PROCESS_PER="gpu",
          PORT="7000",
      ),
  )
  assert command[:8] == [
      "srun",
      "--nodes=2",
      "--ntasks=16",
      "--ntasks-per-node=8",
      "--kill-on-bad-exit=1",
      "env",
      "PICIE_COORDINATOR=nodeA:7000",
      "PICIE_NUM_PROCESSES=16",
  ]
  assert _slurm_task_env(command, SLURM_PROCID="13", SLURM_LOCALID="5") == ["13", "5"]


@pytest.mark.parametrize(
    "nodelist, first", [("node7", "node7"), ("a[01-04]", "a01"), ("gpu[010,003-004]", "gpu010")]
)
def test_slurm_coordinator_is_the_first_node(nodelist, first):
  (command,) = _dry_run("slurm.sh", **dict(_SLURM, SLURM_JOB_NODELIST=nodelist, PORT="1"))
  assert f"PICIE_COORDINATOR={first}:1" in command


def test_slurm_outside_a_job_says_so():
  out = subprocess.run(
      [os.path.join(LAUNCH, "slurm.sh"), "--dry-run", "c.py", "w"],
      env={"PATH": os.environ["PATH"]},
      capture_output=True,
      text=True,
      timeout=30,
  )
  assert out.returncode != 0 and "sbatch" in out.stderr


def test_launch_scripts_pass_shellcheck():
  scripts = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")))
  out = subprocess.run([_SHELLCHECK, *scripts], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr


_JOIN_UNDER_SLURM = """
from picie_jax import parallel
from jax._src import xla_bridge
parallel.maybe_initialize_distributed()
print(xla_bridge.process_count(), xla_bridge.CUDA_VISIBLE_DEVICES.value)
"""


def test_coordinator_keeps_every_gpu_under_slurm():
  """A process joined through PICIE_COORDINATOR inside a SLURM task keeps all its GPUs: jax's
  SLURM detection would keep only GPU SLURM_LOCALID (one process per node on one GPU)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT,
      SLURM_JOB_ID="1",
      SLURM_STEP_NODELIST="localhost",
      SLURM_NTASKS="1",
      SLURM_PROCID="0",
      SLURM_LOCALID="1",
      PICIE_COORDINATOR=f"127.0.0.1:{port}",
      PICIE_NUM_PROCESSES="1",
      PICIE_PROCESS_ID="0",
  )
  out = subprocess.run(
      [sys.executable, "-c", _JOIN_UNDER_SLURM],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["1", "all"]
