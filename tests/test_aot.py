"""benchmarks.aot compiles steps for a TPU topology from this host (when libtpu is installed)."""

import jax
import pytest

from benchmarks import aot
from configs import pixel_kmeans_synthetic
from picie_jax import parallel
from picie_jax import platform


@pytest.fixture(scope="module")
def tpu_mesh():
  try:
    devices = aot.topology_devices("v5e:2x2")
  except (Exception, SystemExit) as error:  # noqa: BLE001 - libtpu absent or unusable here
    pytest.skip(f"no TPU topology without libtpu (pip install -e '.[tpu]'): {error}")
  return parallel.make_mesh(devices)


def test_a_tpu_topology_mesh_is_tpu_from_this_host(tpu_mesh):
  """Here (libtpu holds a lockfile: one test module, one process, uses it)."""
  assert tpu_mesh.size == 4 and platform.platform_of(tpu_mesh) == "tpu"
  assert jax.default_backend() == "cpu"


def test_label_pass_and_kmeans_compile_for_v5e_without_gathering_the_points(tpu_mesh):
  """The raw-pixel recipe (no network: seconds to compile) for 4 v5e chips: the label search
  keeps its rows on their chip (no all-gather), k-means reduces its (K, C) sums only."""
  assert platform.platform_of(tpu_mesh) == "tpu"
  config = pixel_kmeans_synthetic.get_config()
  epoch = aot.epoch_steps(config, tpu_mesh)
  rows = {}
  for name in ("label_counts", "kmeans_minibatch_update"):
    fn, args, kwargs, per_epoch = epoch[name]
    rows[name] = aot.compile_step(name, fn, args, kwargs)
    assert per_epoch > 0 and rows[name]["flops"] > 0 and rows[name]["host_calls"] == []
    assert 0 < aot.peak_bytes(rows[name]) < aot.CHIPS["TPU v5 lite"][2]
  assert "all-gather" not in rows["label_counts"]["collectives"]
  assert set(rows["kmeans_minibatch_update"]["collectives"]) == {"all-reduce"}


def test_collectives_are_parsed_with_their_result_bytes():
  hlo = (
      "  %ag = f32[1024,128]{1,0} all-gather(f32[256,128]{1,0} %p), dimensions={0}\n"
      "  %ar = (f32[27,128]{1,0}, s32[27]{0}) all-reduce-start(%a, %b), to_apply=%sum\n"
      "  %x = f32[4]{0} add(%y, %z)\n"
  )
  assert aot.collectives(hlo) == {
      "all-gather": {"count": 1, "bytes": 1024 * 128 * 4},
      "all-reduce": {"count": 1, "bytes": 27 * 128 * 4 + 27 * 4},
  }


def test_padded_bytes_follow_the_tiled_layout():
  assert aot.padded_bytes("f32[640,3]{1,0:T(8,128)}") == 640 * 128 * 4  # minor dim to 128
  assert aot.padded_bytes("f32[5,130]{1,0:T(8,128)}") == 8 * 256 * 4
  assert aot.padded_bytes("f32[3,640]{0,1:T(8,128)}") == 640 * 128 * 4  # dim 0 is minor
  assert aot.padded_bytes("f32[256]{0:T(256)S(1)}") == 256 * 4
  assert aot.padded_bytes("(bf16[4,4]{1,0}, s32[])") == 4 * 4 * 2 + 4  # no tile: as written


def test_byte_movers_rank_unfused_instructions_by_result_and_operand_bytes():
  hlo = "\n".join(
      [
          "%fused (p: f32[8,128]) -> f32[8,128] {",
          "  %p = f32[8,128]{1,0} parameter(0)",
          "  ROOT %big = f32[4096,128]{1,0} broadcast(%p)",
          "}",
          "ENTRY %main (a: f32[8,128]) -> f32[8,128] {",
          "  %a = f32[8,128]{1,0:T(8,128)} parameter(0)",
          '  %f = f32[8,128]{1,0:T(8,128)} fusion(%a), kind=kLoop, calls=%fused, metadata={op_name="jit(s)/mul"}',
          "  ROOT %r = f32[8,128]{1,0:T(8,128)} all-reduce(%f), to_apply=%fused",
          "}",
      ]
  )
  movers = aot.byte_movers(hlo)
  assert [(m["opcode"], m["bytes"], m["op_name"]) for m in movers] == [
      ("fusion", 2 * 8 * 128 * 4, "jit(s)/mul"),
      ("all-reduce", 2 * 8 * 128 * 4, ""),
  ]  # the fused computation's broadcast is inside the fusion, not counted again
