"""Reads PyTorch `.pth` files (torch.save output) into numpy arrays without importing torch.

Both formats torch writes are read: the zip archive (the default since torch 1.6) and the
legacy stream (`_use_new_zipfile_serialization=False`, the default before 1.6). The
pickle is read by a restricted unpickler that resolves only the globals state dicts and
training checkpoints need, so no code from the file is imported or run.
"""

import collections
import os
import pickle
import struct
import types
import zipfile

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch dtype name (as a dtype pickles: the global `torch.<name>`) -> numpy dtype.
_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint64": np.uint64,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.bool_,
}
# Typed storage class (the global `torch.<name>` in a storage's persistent id) -> dtype name.
_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


def load(path):
  """The object `torch.save` wrote to `path`, with every tensor as a numpy array.

  Dicts (OrderedDicts with their `_metadata`), lists, tuples and scalars come back as they
  are; `torch.Size` becomes a tuple, a dtype its numpy dtype, and `argparse.Namespace` (the
  `args` of PiCIE checkpoints) a `types.SimpleNamespace`. A tensor comes back as a writable
  numpy view of its storage with the tensor's offset, shape and strides, as `torch.load`
  gives: tensors that shared a storage share memory, non-contiguous ones stay non-contiguous.
  Device locations are ignored (everything lands in host memory, as map_location='cpu'), and
  so are requires_grad and hooks. bfloat16 is `ml_dtypes.bfloat16`.

  Raises FileNotFoundError for a missing file and ValueError naming the file when it is not a
  torch file, is truncated or corrupt, or pickles objects other than the above (e.g. a whole
  torch.nn.Module: such files need torch itself).
  """
  with open(path, "rb") as f:
    try:
      is_zip = f.read(4) == b"PK\x03\x04"  # a zip archive's local file header
      f.seek(0)
      return _load_zip(f) if is_zip else _load_legacy(f)
    except ValueError as e:
      raise ValueError(f"{os.fspath(path)}: {e}") from e
    except EOFError as e:
      raise ValueError(f"{os.fspath(path)}: truncated ({e})") from e
    except zipfile.BadZipFile as e:
      raise ValueError(f"{os.fspath(path)}: corrupt or truncated zip archive ({e})") from e
    except pickle.UnpicklingError as e:
      raise ValueError(f"{os.fspath(path)}: corrupt pickle ({e})") from e


def _load_zip(f):
  """The zip format: `<name>/data.pkl`, one record `<name>/data/<key>` per storage."""
  with zipfile.ZipFile(f) as archive:
    names = set(archive.namelist())
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError("zip archive without exactly one <name>/data.pkl: not a torch file")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"  # zip files from older torch have no byteorder record
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode()
    if byteorder not in ("little", "big"):
      raise ValueError(f"unknown byteorder {byteorder!r}")
    storages = {}

    def storage(key, dtype, numel):
      if key not in storages:
        if f"{prefix}data/{key}" not in names:
          raise ValueError(f"storage {key} is missing from the archive")
        array = np.empty(numel, dtype)
        with archive.open(f"{prefix}data/{key}") as record:
          _read_into(record, array, key)
          if record.read(1):
            raise ValueError(f"storage {key} holds more than its {numel} elements")
        if byteorder == "big":
          array.view(f"u{dtype.itemsize}").byteswap(inplace=True)
        storages[key] = array
      return storages[key]

    with archive.open(pickles[0]) as data:
      return _Unpickler(data, storage).load()


def _load_legacy(f):
  """The legacy stream: magic, protocol and sys_info pickles, the object, storage keys, data.

  The object pickle comes before the storage data, so its storages are allocated as the
  pickle names them and filled in afterwards (the tensors are views of them).
  """
  try:
    magic = _HeaderUnpickler(f).load()
  except Exception:  # pylint: disable=broad-except  # whatever fails to parse is no torch file
    magic = None
  if magic != _LEGACY_MAGIC:
    raise ValueError("not a PyTorch file (neither a zip archive nor a legacy torch.save stream)")
  protocol = _HeaderUnpickler(f).load()
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"legacy torch.save protocol {protocol!r} is not supported")
  _HeaderUnpickler(f).load()  # sys_info: storages are little-endian whatever it says
  storages = {}

  def storage(key, dtype, numel):
    if key not in storages:
      storages[key] = np.empty(numel, dtype)
    return storages[key]

  obj = _Unpickler(f, storage).load()
  for key in _HeaderUnpickler(f).load():
    header = f.read(8)
    if len(header) < 8:
      raise EOFError(f"no data for storage {key}")
    if key not in storages:
      raise ValueError(f"storage {key} is not referenced by the pickle")
    (numel,), array = struct.unpack("<q", header), storages[key]
    if numel != array.size:
      raise ValueError(f"storage {key} has {numel} elements where the pickle says {array.size}")
    _read_into(f, array, key)
  return obj


def _read_into(f, array, key):
  """Fills the contiguous `array` with its bytes from `f` (EOFError when the file ends first)."""
  nbytes = f.readinto(array.view(np.uint8))
  if nbytes != array.nbytes:
    raise EOFError(f"storage {key} has {nbytes} of its {array.nbytes} bytes")


def _tensor(storage, offset, size, stride):
  """The tensor (offset, size, stride in elements) as a view of its 1-D `storage` array."""
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise ValueError(f"invalid tensor geometry (offset {offset}, size {size}, stride {stride})")
  if 0 in size:
    return np.empty(size, storage.dtype)
  if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
    raise ValueError(
        f"tensor (offset {offset}, size {size}, stride {stride}) lies outside "
        f"its storage of {storage.size} elements"
    )
  return np.lib.stride_tricks.as_strided(
      storage[offset:], size, [s * storage.itemsize for s in stride]
  )


def _tensor_from_bytes(storage, offset, size, stride, dtype):
  """`_tensor` of an untyped (uint8) storage read as `dtype`, as torch's _rebuild_tensor_v3."""
  if storage.size % dtype.itemsize:
    raise ValueError(f"storage of {storage.size} bytes does not hold whole {dtype} elements")
  return _tensor(storage.view(dtype), offset, size, stride)


class _HeaderUnpickler(pickle.Unpickler):
  """Unpickles plain data only (the legacy format's header pickles and storage key list)."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


class _Unpickler(pickle.Unpickler):
  """Unpickles a torch.save object, resolving only the globals tensors and checkpoints use.

  `storage(key, dtype, numel)` returns the 1-D array of the storage a persistent id names.
  """

  _GLOBALS = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch", "Size"): tuple,
      ("argparse", "Namespace"): types.SimpleNamespace,
      ("torch.storage", "UntypedStorage"): np.dtype(np.uint8),
      ("torch._utils", "_rebuild_tensor"): _tensor,
      ("torch._utils", "_rebuild_tensor_v2"): lambda storage, offset, size, stride, *_: _tensor(
          storage, offset, size, stride
      ),
      (
          "torch._utils",
          "_rebuild_tensor_v3",
      ): lambda storage, offset, size, stride, _grad, _hooks, dtype, *_: _tensor_from_bytes(
          storage, offset, size, stride, dtype
      ),
      ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
      ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
      **{("torch", name): np.dtype(dtype) for name, dtype in _DTYPES.items()},
      **{("torch", name): np.dtype(_DTYPES[dtype]) for name, dtype in _STORAGES.items()},
  }

  def __init__(self, file, storage):
    super().__init__(file)
    self._storage = storage

  def find_class(self, module, name):
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[module, name]
    if module.startswith("torch.nn."):
      raise ValueError(
          f"pickles torch.nn.Module objects (class {module}.{name}): "
          "save model.state_dict() instead"
      )
    raise ValueError(
        f"pickles class {module}.{name}, which cannot be read without torch (only "
        "tensors, containers, scalars and argparse.Namespace can; for a whole "
        "model, save model.state_dict() instead)"
    )

  def persistent_load(self, pid):
    if not (
        isinstance(pid, tuple)
        and len(pid) in (5, 6)
        and pid[0] == "storage"
        and isinstance(pid[1], np.dtype)
    ):
      raise ValueError(f"unknown persistent id {pid!r:.100}")
    _, dtype, key, _location, numel = pid[:5]
    if len(pid) == 6 and pid[5] is not None:
      raise ValueError("storage views (legacy files from torch < 1.0) are not supported")
    return self._storage(key, dtype, numel)
