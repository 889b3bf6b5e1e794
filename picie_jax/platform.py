"""The platform a computation is compiled for, read off its devices (not the host's backend).

Every platform-dependent form (CPU tap-sum depthwise convolutions, strided-matmul 1x1
convolutions, the max-pool VJP, segment-sum k-means, banded gathers) is chosen from the
devices of the mesh a step runs on, so a TPU or GPU mesh compiles the accelerator forms even
from a CPU host (ahead-of-time compilation for a pod, benchmarks/aot.py).
"""

import numpy as np

CPU = "cpu"


def platform_of(mesh_or_devices) -> str:
  """'cpu', 'gpu' or 'tpu': the platform of a Mesh's devices, a device, or an iterable of
  devices. Mixed platforms are an error (no step runs on such a mesh)."""
  devices = getattr(mesh_or_devices, "devices", mesh_or_devices)
  if hasattr(devices, "platform"):  # a single device
    return devices.platform
  platforms = {device.platform for device in np.asarray(devices, dtype=object).flat}
  if len(platforms) != 1:
    raise ValueError(f"expected devices of one platform, got {sorted(platforms) or 'none'}")
  return platforms.pop()


def uses_cpu_forms(platform: str) -> bool:
  """Whether the CPU forms of the ops win on `platform` (a `platform_of` value)."""
  return platform == CPU
