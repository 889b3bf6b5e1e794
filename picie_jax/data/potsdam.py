"""ISPRS Potsdam in the 200x200-tile form IIC made and STEGO reuses, as a TFDS dataset, and its
two class settings (potsdam6: the 6 ISPRS classes; potsdam3: IIC's Potsdam-3).

The facts this follows (xu-ji/IIC at b7602b7, mhamilton723/STEGO at eb4d6b5):
- Layout: `imgs/<id>.mat` (key 'img'), `gt/<id>.mat` (key 'gt'), id lists `<split>.txt`, one
  id a line (IIC code/datasets/segmentation/potsdam.py:384-406; STEGO src/data.py:128-155).
  IIC's tar also has `debugged.out` (potsdam.py:42), STEGO's zip `all.txt` (data.py:134);
  neither is needed here.
- Tiles: each 6000x6000 RGBIR orthophoto halved (cv2 INTER_LINEAR) and cut into 15x15 tiles of
  200x200 (IIC util/potsdam_prepare.py:109-134); 'img' is uint8 HxWx4 = R, G, B, IR
  (potsdam_prepare.py:56, potsdam.py:399), 'gt' int32 HxW (potsdam.py:403).
- Fine labels from the ISPRS colours: 0 impervious surfaces (roads), 1 building, 2 low
  vegetation, 3 tree, 4 car, 5 clutter (potsdam_prepare.py:142-148); no ignore value is
  written, STEGO maps 255 to ignored (data.py:147), as here.
- Potsdam-3 (IIC's name; `--use_coarse_labels --gt_k 3`, examples/commands.txt:82-86) merges
  roads+cars -> 0, buildings+clutter -> 1, low vegetation+trees -> 2 (potsdam.py:418-421, the
  same dict in STEGO data.py:144-148); "Potsdam" (commands.txt:88-89, gt_k 6) keeps the six.
- Splits: 38 images x 225 tiles; 855 tiles of the 24 labelled images are `labelled_test`, the
  other labelled ones `labelled_train`, the rest `unlabelled_train` (potsdam_prepare.py:18-25,
  84-98). STEGO trains on `labelled_train` (its `unlabelled_train` line is commented out) and
  validates on `labelled_test` (data.py:128-135, train_segmentation.py:424,445); IIC's
  unsupervised mode trains on all three and scores on labelled_train+labelled_test
  (code/utils/segmentation/data.py:38-42). Here: STEGO's, train = labelled_train.txt
  (24 x 225 - 855 = 4,545 tiles), val = labelled_test.txt (855): all labelled, so the probe can
  use train labels, and the split of STEGO's code, which later DINO-based methods start from.
- Channels and sizes: STEGO keeps RGB only (`[:3]`, data.py:153), then resizes (nearest) to
  224 for training and 320 (centre crop) for evaluation (train_segmentation.py:425,446;
  utils.py:165-183); IIC uses RGB+IR at the native 200 (commands.txt:83, --input_sz 200).

Records hold the tile's RGB channels and its fine labels re-encoded as lossless PNGs (the IR
channel is dropped), so the shared decoding path reads them; labels are mapped when read, so
one preparation serves potsdam3 and potsdam6.
"""

import io

import numpy as np
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds

from picie_jax.data import prepared

_SPLIT_FILES = {"train": "labelled_train.txt", "val": "labelled_test.txt"}
_ARCHIVE = (
    "Potsdam.tar.gz (https://www.robots.ox.ac.uk/~xuji/datasets/Potsdam.tar.gz, IIC) or "
    "potsdam.zip (STEGO's download_datasets.py)"
)
FINE_NAMES = ("impervious surfaces", "building", "low vegetation", "tree", "car", "clutter")
COARSE_NAMES = ("roads and cars", "buildings and clutter", "vegetation and trees")
COARSE_OF_FINE = (0, 1, 2, 2, 0, 1)
UNLABELLED = 255


class PiciePotsdam(prepared.RawFilesBuilder):
  """ISPRS Potsdam 200x200 tiles of IIC (RGB as PNG; fine labels 0-5, 255 unlabelled, as PNG):
  train = labelled_train.txt, val = labelled_test.txt, in list order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "RGB and fine labels of the .mat tiles as PNG, list order."}
  HOMEPAGE = "https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-potsdam.aspx"
  CITATION = (
      "Rottensteiner et al. The ISPRS benchmark on urban object classification and 3D building "
      "reconstruction. ISPRS Annals 2012. Ji, Henriques, Vedaldi. Invariant Information "
      "Clustering. ICCV 2019."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Extract {_ARCHIVE} and give its top directory as the manual directory
  (config.dataset.manual_dir); it holds:
    imgs/<id>.mat   key 'img': uint8 200x200x4 (R, G, B, IR)
    gt/<id>.mat     key 'gt': 200x200 integer labels 0-5
    {_SPLIT_FILES['train']}, {_SPLIT_FILES['val']}   one id a line
  """

  def file_pairs(self, root):
    return {split: _listed_pairs(root, list_name) for split, list_name in _SPLIT_FILES.items()}

  def read_pair(self, root, image_file, label_file):
    image = _read_mat(root / image_file, "img")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] < 3:
      raise ValueError(
          f"{root / image_file}: 'img' is {image.dtype} {image.shape}, expected uint8 HxWx4 "
          "(R, G, B, IR) as IIC's potsdam_prepare.py writes"
      )
    label = _read_mat(root / label_file, "gt")
    if label.shape != image.shape[:2] or label.dtype.kind not in "iu":
      raise ValueError(
          f"{root / label_file}: 'gt' is {label.dtype} {label.shape}, expected integers of "
          f"its image's size {image.shape[:2]}"
      )
    undefined = np.setdiff1d(label, [*range(len(FINE_NAMES)), UNLABELLED])
    if undefined.size:
      raise ValueError(
          f"{root / label_file}: 'gt' has values {undefined.tolist()} outside the classes "
          f"0-{len(FINE_NAMES) - 1} ({UNLABELLED} = unlabelled)"
      )
    rgb_png = tf.io.encode_png(image[:, :, :3]).numpy()
    label_png = tf.io.encode_png(label.astype(np.uint8)[:, :, None]).numpy()
    return rgb_png, label_png


def _listed_pairs(root, list_name):
  """(image, label) paths relative to `root` of the ids in `list_name`, in list order."""
  list_file = root / list_name
  if not list_file.is_file():
    raise FileNotFoundError(f"{list_file} is missing: it comes with {_ARCHIVE}.")
  ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
  if not ids:
    raise ValueError(f"{list_file} lists no ids")
  prepared.require_dir(root, "imgs", _ARCHIVE)
  prepared.require_dir(root, "gt", _ARCHIVE)
  pairs = [(f"imgs/{i}.mat", f"gt/{i}.mat") for i in ids]
  prepared.require_files(root, [p for p, _ in pairs], _ARCHIVE)
  prepared.require_files(root, [p for _, p in pairs], _ARCHIVE)
  return pairs


def _read_mat(path, key):
  """The array stored under `key` in the MATLAB file `path`; errors name the file."""
  try:
    contents = scipy.io.loadmat(io.BytesIO(path.read_bytes()))
  except (ValueError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
    raise ValueError(f"{path} is not a readable MATLAB .mat file ({e})") from e
  if key not in contents:
    stored = sorted(k for k in contents if not k.startswith("__"))
    raise ValueError(f"{path} has no array {key!r} (it has {stored})")
  return contents[key]


def label_setting(name):
  """For potsdam6 / potsdam3: ({stored fine label: class or -1}, class names)."""
  if name == "potsdam6":
    mapping, class_names = {f: f for f in range(len(FINE_NAMES))}, FINE_NAMES
  elif name == "potsdam3":
    mapping, class_names = dict(enumerate(COARSE_OF_FINE)), COARSE_NAMES
  else:
    raise ValueError(f"{name!r} is not a Potsdam setting")
  return {**mapping, UNLABELLED: -1}, class_names
