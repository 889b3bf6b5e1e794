"""ResNet + FPN against torch's shape formulas, numpy float64 references and torchvision's names."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from picie_jax.convert import torch_names
from picie_jax.core.transforms import resize_bilinear
from picie_jax.models import efficientnet
from picie_jax.models import layers
from picie_jax.models import resnet
from picie_jax.models.fpn import FPNDecoder
from picie_jax.models.fpn import PiCIENet
from picie_jax.models.fpn import model_from_config
from picie_jax.models.layers import BatchNorm
from picie_jax.models.layers import DepthwiseConv
from picie_jax.models.layers import depthwise_conv_taps
from picie_jax.models.resnet import ResidualBlock
from picie_jax.models.resnet import ResNet

EPS = 1e-5


# ---------------------------------------------------------------- numpy float64 references
def conv2d_ref(x_bhwc, w_hwio, stride, pad):
  """Direct convolution with torch's zero padding, as a sum over kernel taps."""
  x = np.pad(x_bhwc, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w_hwio.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w_hwio.shape[3]))
  for i in range(kh):
    for j in range(kw):
      window = x[
          :, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride
      ]
      out += window @ w_hwio[i, j]
  return out


def max_pool_ref(x_bhwc):
  """torch MaxPool2d(3, stride=2, padding=1): implicit -inf padding."""
  x = np.pad(x_bhwc, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max(
      [
          x[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2]
          for i in range(3)
          for j in range(3)
      ],
      axis=0,
  )


def bn_eval_ref(x, bn):
  return (x - bn["mean"]) / np.sqrt(bn["var"] + EPS) * bn["scale"] + bn["bias"]


def interp_matrix_ref(in_size, out_size):
  """torch's upsample_bilinear2d (align_corners=False) along one axis, as an (out, in) matrix."""
  m = np.zeros((out_size, in_size))
  for dst in range(out_size):
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    lam = src - i0
    m[dst, i0] += 1 - lam
    m[dst, i1] += lam
  return m


def resize_ref(x_bhwc, size_hw):
  mh, mw = interp_matrix_ref(x_bhwc.shape[1], size_hw[0]), interp_matrix_ref(
      x_bhwc.shape[2], size_hw[1]
  )
  return np.einsum("ph,bhwc,qw->bpqc", mh, x_bhwc, mw)


def torch_out(size, kernel, stride, pad):
  return (size + 2 * pad - kernel) // stride + 1


def torch_stage_sizes(size):
  """Spatial size of res2..res5 by torchvision's layer formulas."""
  s = torch_out(torch_out(size, 7, 2, 3), 3, 2, 1)  # conv1, maxpool
  sizes = [s]
  for _ in range(3):
    s = torch_out(s, 3, 2, 1)
    sizes.append(s)
  return sizes


# ---------------------------------------------------------------- helpers
def randomized(variables, seed):
  """Random params and plausible BN running statistics, so no layer is an identity."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(variables)
  out = {}
  for path, value in flat.items():
    if path[-1] == "var":
      out[path] = rng.uniform(0.5, 2.0, value.shape)
    else:
      out[path] = rng.normal(0.0, 0.5, value.shape)
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in out.items()})


def as_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def shapes_of(model, x_shape, **kwargs):
  """Output and variable shapes without computing anything."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, **kwargs), x)


def random_variables(model, x_shape, seed, **kwargs):
  """Variables of `model` filled by `randomized`; skips flax init, whose per-shape RNG compiles are slow."""
  return randomized(shapes_of(model, x_shape, **kwargs)[1], seed)


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("hw", [(64, 64), (80, 80), (100, 100), (45, 45), (45, 80)])
def test_stage_shapes_follow_torch_formulas(hw):
  width = 8
  feats, _ = shapes_of(ResNet(depth=18, width=width), (2, *hw, 3), train=False)
  for k, (h, w) in enumerate(zip(torch_stage_sizes(hw[0]), torch_stage_sizes(hw[1]))):
    assert feats[f"res{k + 2}"].shape == (2, h, w, width * 2**k)
  out, _ = shapes_of(PiCIENet("resnet18", width=width, out_channels=16), (2, *hw, 3), train=False)
  assert out.shape == (2, *feats["res2"].shape[1:3], 16)


def test_resnet50_shapes_and_stride_on_3x3():
  feats, _ = shapes_of(ResNet(depth=50, width=8), (1, 80, 80, 3), train=False)
  assert [feats[f"res{k}"].shape for k in range(2, 6)] == [
      (1, 20, 20, 32),
      (1, 10, 10, 64),
      (1, 5, 5, 128),
      (1, 3, 3, 256),
  ]
  out, _ = shapes_of(PiCIENet("resnet50", width=8, out_channels=256), (1, 80, 80, 3), train=False)
  assert out.shape == (1, 20, 20, 256)
  # v1.5: layer2_0's 1x1 conv1 keeps 20x20, its 3x3 conv2 halves it.
  model = ResNet(depth=50, width=8)
  x = jax.ShapeDtypeStruct((1, 80, 80, 3), jnp.float32)
  _, variables = shapes_of(model, x.shape, train=False)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True), variables, x
  )
  block = state["intermediates"]["layer2_0"]
  assert block["conv1"]["__call__"][0].shape == (1, 20, 20, 16)
  assert block["conv2"]["__call__"][0].shape == (1, 10, 10, 16)


@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (50, 23_508_032)])
def test_parameter_count_matches_torchvision_without_fc(depth, expected):
  # torchvision resnet18 has 11,689,512 parameters and resnet50 25,557,032, fc included.
  _, variables = shapes_of(ResNet(depth=depth), (1, 64, 64, 3), train=False)
  assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == expected


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("hw", [(12, 12), (13, 10)])
def test_stem_matches_direct_convolution_with_torch_padding(hw):
  model = ResNet(depth=18, width=4)
  x = np.random.default_rng(0).normal(size=(2, *hw, 3))
  variables = random_variables(model, x.shape, 1, train=False)
  captured = {}

  def capture_stem_skip_blocks(next_fn, args, kwargs, context):
    if isinstance(context.module, ResidualBlock) and context.method_name == "__call__":
      captured.setdefault("x", args[0])  # layer1_0's input is the stem's output
      return args[0]
    return next_fn(*args, **kwargs)

  with nn.intercept_methods(capture_stem_skip_blocks):
    model.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  v = as_numpy(variables)
  bn1 = {**v["params"]["bn1"], **v["batch_stats"]["bn1"]}
  y = conv2d_ref(x, v["params"]["conv1"]["kernel"], stride=2, pad=3)
  expected = max_pool_ref(np.maximum(bn_eval_ref(y, bn1), 0))
  np.testing.assert_allclose(captured["x"], expected, rtol=1e-4, atol=1e-4)


def block_ref(x, v, bottleneck, stride):
  """torchvision BasicBlock / Bottleneck (stride on the 3x3) in eval mode."""
  p, s = v["params"], v["batch_stats"]

  def bn(y, name):
    return bn_eval_ref(y, {**p[name], **s[name]})

  if bottleneck:
    layers = [("conv1", 1, 0), ("conv2", stride, 1), ("conv3", 1, 0)]
  else:
    layers = [("conv1", stride, 1), ("conv2", 1, 1)]
  y = x
  for i, (name, conv_stride, pad) in enumerate(layers):
    y = bn(conv2d_ref(y, p[name]["kernel"], conv_stride, pad), name.replace("conv", "bn"))
    if i < len(layers) - 1:
      y = np.maximum(y, 0)
  shortcut = x
  if "downsample_0" in p:
    shortcut = bn(conv2d_ref(x, p["downsample_0"]["kernel"], stride, 0), "downsample_1")
  return np.maximum(y + shortcut, 0)


@pytest.mark.parametrize(
    "bottleneck,stride,in_channels,has_downsample",
    [
        (False, 1, 4, False),
        (False, 2, 4, True),
        (True, 1, 4, True),
        (True, 2, 16, True),
        (True, 1, 16, False),
    ],
)
def test_residual_block_matches_numpy(bottleneck, stride, in_channels, has_downsample):
  block = ResidualBlock(planes=4, stride=stride, bottleneck=bottleneck)
  x = np.random.default_rng(2).normal(size=(2, 9, 9, in_channels))
  variables = random_variables(block, x.shape, 3, train=False)
  assert ("downsample_0" in variables["params"]) == has_downsample
  out = block.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  expected = block_ref(x, as_numpy(variables), bottleneck, stride)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "in_hw,out_hw", [((5, 5), (10, 10)), ((13, 13), (25, 25)), ((7, 9), (13, 18)), ((2, 3), (3, 5))]
)
def test_resize_bilinear_matches_torch_half_pixel_formula(in_hw, out_hw):
  x = np.random.default_rng(4).normal(size=(2, *in_hw, 3))
  out = resize_bilinear(jnp.asarray(x, jnp.float32), out_hw)
  np.testing.assert_allclose(out, resize_ref(x, out_hw), rtol=1e-5, atol=1e-5)


def test_fpn_decoder_matches_numpy_top_down_sum():
  rng = np.random.default_rng(5)
  sizes = {"res2": (12, 11), "res3": (6, 6), "res4": (3, 3), "res5": (2, 2)}  # 45x41 input
  feats = {k: rng.normal(size=(2, *hw, 4 * 2**i)) for i, (k, hw) in enumerate(sizes.items())}
  decoder = FPNDecoder(out_channels=5)
  _, variables = jax.eval_shape(
      decoder.init_with_output, jax.random.key(0), jax.tree.map(jnp.asarray, feats)
  )
  variables = randomized(variables, 5)
  out = decoder.apply(variables, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), feats))
  p = as_numpy(variables)["params"]

  def lateral(name, x):
    return x @ p[name]["kernel"][0, 0] + p[name]["bias"]

  expected = lateral("layer1", feats["res5"])
  for name, level in (("layer2", "res4"), ("layer3", "res3"), ("layer4", "res2")):
    expected = resize_ref(expected, sizes[level]) + lateral(name, feats[level])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- BatchNorm
def test_batchnorm_train_eval_and_running_update_match_torch():
  rng = np.random.default_rng(6)
  x = rng.normal(3.0, 2.0, size=(4, 3, 5, 2))
  bn = BatchNorm()
  initial = bn.init(jax.random.key(0), jnp.asarray(x, jnp.float32), use_running_average=False)
  for name, value in (("mean", 0.0), ("var", 1.0)):  # init in training mode leaves them
    np.testing.assert_array_equal(initial["batch_stats"][name], value)
  variables = randomized(initial, 7)
  v = as_numpy(variables)
  out, updates = bn.apply(
      variables, jnp.asarray(x, jnp.float32), use_running_average=False, mutable=["batch_stats"]
  )
  n = x.size // 2
  mean, var_biased = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  expected = (x - mean) / np.sqrt(var_biased + EPS) * v["params"]["scale"] + v["params"]["bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.9 * v["batch_stats"]["mean"] + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(
      stats["var"], 0.9 * v["batch_stats"]["var"] + 0.1 * var_biased * n / (n - 1), rtol=1e-5
  )
  eval_out = bn.apply(
      {**variables, **updates}, jnp.asarray(x, jnp.float32), use_running_average=True
  )
  np.testing.assert_allclose(
      eval_out, bn_eval_ref(x, {**v["params"], **as_numpy(stats)}), rtol=1e-4, atol=1e-4
  )
  assert np.abs(np.asarray(eval_out) - np.asarray(out)).max() > 0.1


def test_batchnorm_refuses_one_value_per_channel_in_training():
  bn = BatchNorm()
  x = jnp.ones((1, 1, 1, 2))
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(ValueError, match=r"\(1, 1, 1, 2\)"):
    bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


def test_resnet_train_mode_uses_batch_stats_and_updates_running_averages():
  model = ResNet(depth=18, width=4)
  x = jnp.asarray(np.random.default_rng(8).normal(1.0, 1.0, size=(2, 64, 64, 3)), jnp.float32)
  variables = random_variables(model, x.shape, 9, train=False)
  train_feats, state = model.apply(
      variables,
      x,
      train=True,
      mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda m, _: m.name == "bn1",
  )
  bn1_out = np.asarray(state["intermediates"]["bn1"]["__call__"][0], np.float64)
  bn1 = as_numpy(variables["params"]["bn1"])  # batch statistics: output mean = bias, var = scale^2
  np.testing.assert_allclose(bn1_out.mean(axis=(0, 1, 2)), bn1["bias"], atol=1e-4)
  np.testing.assert_allclose(bn1_out.var(axis=(0, 1, 2)), bn1["scale"] ** 2, rtol=1e-3)
  old = flax.traverse_util.flatten_dict(variables["batch_stats"])
  new = flax.traverse_util.flatten_dict(state["batch_stats"])
  assert old.keys() == new.keys()
  assert all(not np.allclose(old[k], new[k]) for k in old)
  eval_feats = model.apply({**variables, "batch_stats": state["batch_stats"]}, x, train=False)
  assert np.abs(np.asarray(eval_feats["res5"]) - np.asarray(train_feats["res5"])).max() > 1e-2


# ---------------------------------------------------------------- init
def test_init_matches_torch_distributions():
  block = ResidualBlock(planes=128, stride=1, bottleneck=False)
  params = block.init(jax.random.key(1), jnp.zeros((1, 2, 2, 128)), train=False)["params"]
  kernel = np.asarray(params["conv2"]["kernel"])  # (3, 3, 128, 128)
  std = np.sqrt(2.0 / (9 * 128))  # kaiming normal, fan_out
  assert abs(kernel.std() / std - 1) < 0.02
  assert np.abs(kernel).max() > 3.5 * std  # untruncated normal
  assert np.all(np.asarray(params["bn2"]["scale"]) == 1)
  assert np.all(np.asarray(params["bn2"]["bias"]) == 0)
  feats = {f"res{k}": jnp.zeros((1, 2, 2, 128)) for k in range(2, 6)}
  params = FPNDecoder(out_channels=64).init(jax.random.key(2), feats)["params"]
  bound = 1 / np.sqrt(128)  # torch Conv2d default: U(+-1/sqrt(fan_in)) for weight and bias
  kernel = np.abs(np.asarray(params["layer1"]["kernel"]))
  assert kernel.max() <= bound and kernel.max() > 0.99 * bound
  assert abs(kernel.mean() / (bound / 2) - 1) < 0.05  # |U(-b, b)| has mean b / 2
  assert np.abs(np.asarray(params["layer1"]["bias"])).max() <= bound


# ---------------------------------------------------------------- torchvision names
def torchvision_resnet18_shapes():
  """torchvision resnet18 state_dict keys and shapes, without fc and num_batches_tracked."""
  shapes = {}

  def conv_bn(conv, bn, out_ch, in_ch, k):
    shapes[f"{conv}.weight"] = (out_ch, in_ch, k, k)
    for name in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{bn}.{name}"] = (out_ch,)

  conv_bn("conv1", "bn1", 64, 3, 7)
  in_ch = 64
  for stage in range(1, 5):
    planes = 64 * 2 ** (stage - 1)
    for block in range(2):
      prefix = f"layer{stage}.{block}"
      conv_bn(f"{prefix}.conv1", f"{prefix}.bn1", planes, in_ch, 3)
      conv_bn(f"{prefix}.conv2", f"{prefix}.bn2", planes, planes, 3)
      if stage > 1 and block == 0:
        conv_bn(f"{prefix}.downsample.0", f"{prefix}.downsample.1", planes, in_ch, 1)
      in_ch = planes
  return shapes


def torch_layout(shape):
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def test_resnet18_names_are_a_rename_of_torchvision_state_dict():
  expected = torchvision_resnet18_shapes()
  assert len(expected) == 100  # 20 convs + 20 BNs x 4
  _, variables = shapes_of(ResNet(depth=18), (1, 64, 64, 3), train=False)
  names = torch_names(variables, "resnet18")
  flat = flax.traverse_util.flatten_dict(variables)
  assert {names[p]: torch_layout(flat[p].shape) for p in flat} == expected
  assert len(set(names.values())) == len(names)


def test_picie_net_names_match_panoptic_fpn_layout():
  _, variables = shapes_of(PiCIENet("resnet18"), (1, 64, 64, 3), train=False)
  names = torch_names(variables, "resnet18")
  flat = flax.traverse_util.flatten_dict(variables)
  got = {names[p]: torch_layout(flat[p].shape) for p in flat}
  expected = {f"backbone.{k}": s for k, s in torchvision_resnet18_shapes().items()}
  for layer, in_ch in (("layer1", 512), ("layer2", 256), ("layer3", 128), ("layer4", 64)):
    expected[f"decoder.{layer}.weight"] = (128, in_ch, 1, 1)
    expected[f"decoder.{layer}.bias"] = (128,)
  assert got == expected


# ---------------------------------------------------------------- config and jit
def model_config(**overrides):
  return ml_collections.ConfigDict(
      {"backbone": "resnet50", "width": 8, "fpn_channels": 16, "dtype": "float32", **overrides}
  )


def test_model_from_config():
  model = model_from_config(model_config(), "cpu")
  assert (model.backbone_name, model.width, model.out_channels) == ("resnet50", 8, 16)
  assert model_from_config(model_config(dtype="bfloat16"), "cpu").dtype == jnp.bfloat16
  for key, value in (
      ("backbone", "resnet19"),
      ("backbone", "vgg16"),
      ("width", 0),
      ("fpn_channels", 2.5),
      ("dtype", "float16"),
  ):
    with pytest.raises(ValueError, match=f"model.{key}"):
      model_from_config(model_config(**{key: value}), "cpu")


def test_jitted_forward_runs_and_updates_stats():
  model = model_from_config(model_config(backbone="resnet18", width=4), "cpu")
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 45, 45, 3)), jnp.float32)
  variables = random_variables(model, x.shape, 10, train=False)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  feats, state = forward(variables, x)
  assert feats.shape == (2, 12, 12, 16) and np.all(np.isfinite(np.asarray(feats)))
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


# ---------------------------------------------------------------- EfficientNet-Lite0
def test_input_normalisations():
  images = np.random.default_rng(7).uniform(0, 1, (2, 3, 3, 3)).astype(np.float32)
  want = (images - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(resnet.normalize_input(jnp.asarray(images)), want, atol=1e-6)
  np.testing.assert_allclose(
      efficientnet.normalize_input(jnp.asarray(images)), (images * 255 - 127) / 128, atol=1e-5
  )


@pytest.mark.parametrize(
    "hw,k,stride", [((9, 9), 3, 1), ((9, 8), 3, 2), ((10, 7), 5, 2), ((4, 4), 5, 1), ((2, 3), 3, 2)]
)
def test_depthwise_taps_equal_grouped_convolution_and_its_gradient(hw, k, stride):
  """The CPU form (a sum over taps) against XLA's grouped convolution, values and gradients."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, *hw, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 1, 6)), jnp.float32)

  def grouped(x, w):
    return jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=6,
    )

  def taps(x, w):
    return depthwise_conv_taps(x, w, stride)

  np.testing.assert_allclose(taps(x, w), grouped(x, w), rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.normal(size=grouped(x, w).shape), jnp.float32)

  def grad(f):
    return jax.grad(lambda x, w: jnp.sum(f(x, w) * cot), argnums=(0, 1))(x, w)

  for got, want in zip(grad(taps), grad(grouped)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  module = DepthwiseConv(k, stride)
  variables = module.init(jax.random.key(0), x)
  assert variables["params"]["kernel"].shape == (k, k, 1, 6)
  np.testing.assert_allclose(
      module.apply({"params": {"kernel": w}}, x), grouped(x, w), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
    "hw,stride,padding",
    [
        ((9, 9), 1, "SAME"),
        ((9, 8), 2, "SAME"),
        ((7, 10), 2, "VALID"),
        ((5, 5), 1, ((0, 0), (0, 0))),
    ],
)
def test_1x1_conv_as_matmul_equals_lax_convolution_and_its_gradient(hw, stride, padding):
  """The CPU form of a 1x1 convolution (strided slice + matmul) against XLA's convolution."""
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(2, *hw, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 5, 7)), jnp.float32)
  dims = ("NHWC", "HWIO", "NHWC")

  def plain(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dims)

  def ours(x, w):
    return layers.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=dims, platform="cpu"
    )

  np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.normal(size=plain(x, w).shape), jnp.float32)

  def grad(f):
    return jax.grad(lambda x, w: jnp.sum(f(x, w) * cot), argnums=(0, 1))(x, w)

  for got, want in zip(grad(ours), grad(plain)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  jaxpr = str(jax.make_jaxpr(ours)(x, w))
  assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr  # the CPU form ran


@pytest.mark.parametrize("hw", [(9, 7), (8, 6), (3, 2)])
def test_stem_max_pool_backward_routes_to_the_first_maximum_as_torch(hw):
  """The CPU max-pool gradient against torch.nn.functional.max_pool2d's, with many ties
  (small integers) so the window's first maximum in row-major order must be the one chosen."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(13)
  x = rng.integers(0, 3, size=(2, *hw, 4)).astype(np.float32)
  g = rng.normal(size=(2, -(-hw[0] // 2), -(-hw[1] // 2), 4)).astype(np.float32)
  x_torch = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  out_torch = torch.nn.functional.max_pool2d(x_torch, 3, stride=2, padding=1)
  out_torch.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
  cpu_max_pool = functools.partial(layers.max_pool_3x3_s2, platform="cpu")
  out, vjp = jax.vjp(cpu_max_pool, jnp.asarray(x))
  np.testing.assert_array_equal(out, out_torch.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(
      vjp(jnp.asarray(g))[0], x_torch.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6
  )
  assert "custom_vjp" in str(jax.make_jaxpr(cpu_max_pool)(jnp.asarray(x)))


def test_efficientnet_lite0_levels_and_parameter_count():
  feats, variables = shapes_of(
      efficientnet.EfficientNetLite0(num_classes=1000), (1, 224, 224, 3), train=False
  )
  assert {k: v.shape for k, v in feats.items()} == {
      "res2": (1, 56, 56, 24),
      "res3": (1, 28, 28, 40),
      "res4": (1, 14, 14, 112),
      "res5": (1, 7, 7, 320),
      "logits": (1, 1000),
  }
  # EfficientNet-Lite0 has 4,652,008 parameters (TF model card), head and fc included.
  assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == 4_652_008
  out, _ = shapes_of(PiCIENet("efficientnet_lite0", out_channels=128), (2, 45, 64, 3), train=False)
  assert out.shape == (2, 12, 16, 128)  # "SAME": ceil(45 / 4) = 12
