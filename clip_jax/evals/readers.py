"""Eval batches from random-access sources, and a class-per-folder source.

Evaluators take any iterable of batch dicts; this module makes them from a
source (anything with `__len__` and `__getitem__` returning records with
'image' and optionally 'label', 'captions' / 'tokens', as clip_jax.data.
sources defines them) and a `preprocess(image) -> float32 [H, W, 3]`
(image: encoded bytes, a path, or a uint8 array).

Why not the training pipeline's eval mode: zero-shot sets have labels but
no captions (the pipeline drops caption-less examples as bad), retrieval
needs *all* captions of an image (the pipeline keeps the first), and the
class-per-folder layout below is not a training source. For the same
reason TFDS classification sets are read by `TfdsClassificationSource`
here (data.sources.TfdsSource requires a caption feature).

Batches (every process reads the same global batches, in source order):
  image        float32 [b, H, W, 3] (zeros in padding / unreadable rows);
  label        int32 [b], -1 where the record has none;
  index        int32 [b], position in the source, -1 for padding;
  mask         float32 [b], 1 for real rows, 0 for padding and for
               examples whose image could not be read or decoded;
  num_skipped  int32 [b], 1 for those unreadable examples;
  captions     with_captions=True: list (per row) of lists of str, or of
               int32 token arrays for pre-tokenised sources.
The last batch is padded to `batch_size` rows.
With `rows` (record_batches), a process decodes only the images its own
devices embed: 'image' holds those rows, 'image_rows' says which, and
'image_mask' which decoded; the other entries still cover every row.

Image folders (`ClassFolderSource`): root/<class folder>/**/*.{png,jpg,jpeg}
(extension case-insensitive, nested folders included). Classes are the
class folders in sorted order; a class name is its folder name with '_'
read as a space ('golden_retriever' -> 'golden retriever'). Folders whose
name starts with '.' are ignored; an empty class folder is still a class.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def class_name_from_folder(folder: str) -> str:
  return folder.replace("_", " ")


class ClassFolderSource:
  """root/<class>/*.png|jpg|jpeg as records {'image': path, 'label', 'id'}."""

  def __init__(self, root: str, extensions=IMAGE_EXTENSIONS):
    if not os.path.isdir(root):
      raise FileNotFoundError(
          f"Image folder {root!r} does not exist; expected "
          "root/<class name>/*.png|jpg|jpeg.")
    self.root = root
    folders = sorted(f for f in os.listdir(root) if not f.startswith(".")
                     and os.path.isdir(os.path.join(root, f)))
    if not folders:
      raise ValueError(f"Image folder {root!r} has no class sub-folders; "
                       "expected root/<class name>/*.png|jpg|jpeg.")
    self.class_names = [class_name_from_folder(f) for f in folders]
    if len(set(self.class_names)) != len(folders):
      raise ValueError(f"Class folders of {root!r} differ only in '_' vs "
                       f"' ': {folders}.")
    extensions = tuple(e.lower() for e in extensions)
    self.records = []
    for label, folder in enumerate(folders):
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
          if os.path.splitext(name)[1].lower() in extensions:
            path = os.path.join(dirpath, name)
            self.records.append({"image": path, "label": label,
                                 "id": os.path.relpath(path, root)})
    if not self.records:
      raise ValueError(f"No {'/'.join(extensions)} images under the class "
                       f"folders of {root!r}.")

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return dict(self.records[index])


class TfdsClassificationSource:
  """A TFDS classification dataset (prepared as array_record) as records
  {'image', 'label', 'id'}; class_names = features[label_key].names.

  Needs only images and labels (no caption feature); tensorflow-datasets
  is imported here, TensorFlow is not needed.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label"):
    from clip_jax.data import sources  # pylint: disable=g-import-not-at-top
    self.name, self.image_key, self.label_key = name, image_key, label_key
    self.data = sources.open_tfds(name, split, data_dir)
    feature = _lookup(self.data.dataset_info.features, label_key)
    names = list(getattr(feature, "names", None) or [])
    self.class_names = names or None

  def __len__(self):
    return len(self.data)

  def __getitem__(self, index):
    example = self.data[index]
    return {"image": _lookup(example, self.image_key),
            "label": int(_lookup(example, self.label_key)),
            "id": f"{self.name}/{index}"}


def _lookup(tree, key: str):
  """tree['a/b'] -> tree['a']['b']."""
  for part in key.split("/"):
    tree = tree[part]
  return tree


def _read_image(image):
  """Paths are read to bytes here (preprocess gets bytes or arrays)."""
  if isinstance(image, (str, os.PathLike)):
    with open(image, "rb") as f:
      return f.read()
  return image


def record_batches(source, preprocess: Callable, batch_size: int, *,
                   with_captions: bool = False, num_threads: int = 0,
                   rows=None, image_shape=None):
  """Yields the eval batches of `source` (module docstring).

  num_threads > 0 reads and preprocesses each batch's rows in that many
  threads (the output does not depend on it).

  rows (positions in a batch, e.g. sharding.host_rows(mesh, batch_size)):
  decode only those images, the ones this process's devices embed. Every
  other entry still covers all rows (records are read, images are not).
  Then 'image' is float32 [len(rows), *image_shape] (image_shape is
  required: every process must agree on it), 'image_rows' int32 the rows
  it holds, and 'image_mask' float32 [len(rows)] 1 where the image was
  decoded; 'mask' and 'num_skipped' cover only records that could not be
  read (the same on every process), decoding failures are combined across
  processes by evals.embed.embed_batches.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if rows is not None:
    rows = np.asarray(rows, np.int64).reshape(-1)
    if image_shape is None:
      raise ValueError("record_batches(rows=...) needs image_shape.")
    if len(rows) and (rows.min() < 0 or rows.max() >= batch_size):
      raise ValueError(f"rows {rows.min()}..{rows.max()} are outside a "
                       f"batch of {batch_size}.")
  n = len(source)

  def read(index):
    try:
      record = source[index]
      if record.get("error"):
        raise ValueError(record["error"])
      return record, None
    except Exception as e:  # noqa: BLE001  Unreadable: masked and counted.
      return None, f"example {index}: {type(e).__name__}: {e}"

  def decode(index, record):
    try:
      return np.asarray(preprocess(_read_image(record.get("image"))),
                        np.float32), None
    except Exception as e:  # noqa: BLE001  Unreadable: masked and counted.
      return None, f"example {index}: {type(e).__name__}: {e}"

  def load(index):
    record, error = read(index)
    if record is None:
      return None, error
    image, error = decode(index, record)
    return (record, image) if image is not None else (None, error)

  def pmap(fn, *args):
    return list(pool.map(fn, *args) if pool else map(fn, *args))

  num_bad, first_error = 0, None
  pool = (concurrent.futures.ThreadPoolExecutor(num_threads)
          if num_threads > 0 else None)
  try:
    for start in range(0, n, batch_size):
      indices = range(start, min(start + batch_size, n))
      label = np.full(batch_size, -1, np.int32)
      index = np.full(batch_size, -1, np.int32)
      mask = np.zeros(batch_size, np.float32)
      skipped = np.zeros(batch_size, np.int32)
      captions = [[] for _ in range(batch_size)]
      if rows is None:
        loaded = pmap(load, indices)
        shape = image_shape or next(
            (img.shape for r, img in loaded if r is not None), None)
        if shape is None:  # Every row unreadable: nothing to embed.
          shape = (1, 1, 3)
        images = np.zeros((batch_size, *shape), np.float32)
      else:
        loaded = pmap(read, indices)
        images = np.zeros((len(rows), *image_shape), np.float32)
        image_mask = np.zeros(len(rows), np.float32)
        mine = [(k, indices[r], loaded[r][0]) for k, r in enumerate(rows)
                if r < len(indices) and loaded[r][0] is not None]
        decoded = pmap(decode, [i for _, i, _ in mine],
                       [record for _, _, record in mine])
        for (k, _, _), (image, error) in zip(mine, decoded):
          if image is None:
            num_bad += 1
            first_error = first_error or error
            continue
          _check_shape(image, tuple(image_shape), indices[rows[k]])
          images[k], image_mask[k] = image, 1.0
      for row, (i, (record, image)) in enumerate(zip(indices, loaded)):
        index[row] = i
        if record is None:
          skipped[row] = 1
          num_bad += 1
          first_error = first_error or image
          continue
        if rows is None:
          _check_shape(image, images.shape[1:], i)
          images[row] = image
        mask[row] = 1.0
        label[row] = int(record.get("label", -1))
        if with_captions:
          captions[row] = (list(record.get("captions") or [])
                           if "tokens" not in record
                           else [np.asarray(record["tokens"], np.int32)])
      batch = {"image": images, "label": label, "index": index,
               "mask": mask, "num_skipped": skipped}
      if rows is not None:
        batch["image_rows"] = rows.astype(np.int32)
        batch["image_mask"] = image_mask
      if with_captions:
        batch["captions"] = captions
      yield batch
  finally:
    if pool is not None:
      pool.shutdown()
  # With rows, a process sees only its own decoding failures: whether
  # nothing at all was readable is decided after combining (embed_batches).
  if num_bad == n and n and rows is None:
    raise ValueError(f"None of the {n} examples could be read; the first "
                     f"error: {first_error}")
  if num_bad:
    logging.warning("%d of %d eval examples could not be read (masked and "
                    "counted in num_skipped); the first: %s", num_bad, n,
                    first_error)


def _check_shape(image, shape, index):
  if image.shape != tuple(shape):
    raise ValueError(
        f"preprocess returned images of shapes {tuple(shape)} and "
        f"{image.shape} (example {index}); it must return one fixed shape.")
