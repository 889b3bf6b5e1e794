"""The platform of a mesh's devices picks the forms of the ops, whatever the host's backend."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picie_jax import parallel
from picie_jax import platform
from picie_jax.models import layers


def _fake_devices(*platforms):
  return [types.SimpleNamespace(platform=p, process_index=0) for p in platforms]


def test_platform_of_a_device_a_list_and_a_mesh_like_grid():
  assert platform.platform_of(_fake_devices("tpu")[0]) == "tpu"
  assert platform.platform_of(_fake_devices("gpu", "gpu")) == "gpu"
  grid = types.SimpleNamespace(devices=np.array(_fake_devices("tpu", "tpu"), object).reshape(2, 1))
  assert platform.platform_of(grid) == "tpu"
  with pytest.raises(ValueError, match="one platform"):
    platform.platform_of(_fake_devices("cpu", "tpu"))


def _depthwise_jaxpr(platform_name):
  module = layers.DepthwiseConv(3, 1, platform=platform_name)
  x = jnp.zeros((1, 8, 8, 4))
  variables = module.init(jax.random.key(0), x)
  return str(jax.make_jaxpr(module.apply)(variables, x))


def test_a_cpu_mesh_traces_the_cpu_forms_and_an_accelerator_the_grouped_convolution():
  cpu = platform.platform_of(parallel.make_mesh())
  assert cpu == "cpu" and platform.uses_cpu_forms(cpu)
  assert "conv_general_dilated" not in _depthwise_jaxpr(cpu)  # the tap sum
  assert not platform.uses_cpu_forms("tpu") and not platform.uses_cpu_forms("gpu")
  assert "feature_group_count=4" in _depthwise_jaxpr("tpu")
