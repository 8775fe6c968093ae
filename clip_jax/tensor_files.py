"""Reading and writing tensor files without torch: safetensors, and the zip
archives of torch.save / torch.jit.save (.pt, .pth, .bin).

  read_tensors(path) -> {name: np.ndarray}

A path may be a .safetensors file, a HF `model.safetensors.index.json`
(sharded weights), a directory holding either, or a PyTorch zip archive.
PyTorch archives are unpickled with a restricted unpickler: it builds only
tensors (from the archive's raw storages), ordered dicts and inert records
of TorchScript module objects; any other global in the pickle is refused,
so a malicious file cannot run code. The legacy (pre-1.6, non-zip) torch
format is not read: re-save it with a current torch.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

# safetensors dtype names <-> numpy.
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# torch storage class names -> numpy.
_TORCH_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file (header: 8-byte little-endian
  length, then JSON {name: {dtype, shape, data_offsets}})."""
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, "
                       f"not one of {sorted(_ST_DTYPES)}.")
    start, end = info["data_offsets"]
    array = np.frombuffer(data[start:end], _ST_DTYPES[info["dtype"]])
    out[name] = array.reshape(info["shape"]).copy()
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes {name: array} as one .safetensors file (little-endian)."""
  header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name], order="C")  # Keeps 0-d shapes.
    if array.dtype not in _ST_NAMES:
      raise ValueError(f"Tensor {name!r} has dtype {array.dtype}; safetensors "
                       f"takes {sorted(map(str, _ST_NAMES))}.")
    blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": _ST_NAMES[array.dtype],
                    "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)  # The data starts 8-byte aligned.
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


def read_sharded_safetensors(index_path: str) -> dict[str, np.ndarray]:
  """HF's sharded weights: index {'weight_map': {name: shard file}}."""
  with open(index_path) as f:
    weight_map = json.load(f)["weight_map"]
  out = {}
  folder = os.path.dirname(index_path)
  for shard in sorted(set(weight_map.values())):
    out.update(read_safetensors(os.path.join(folder, shard)))
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise ValueError(f"{index_path} lists tensors its shards do not hold: "
                     f"{missing[:5]}.")
  return out


class ModuleRecord:
  """What a TorchScript module object unpickles to: its attributes (pickle
  creates it with NEWOBJ, then sets its state)."""

  attributes: dict = {}

  def __setstate__(self, state):
    self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata.
  itemsize = storage.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Only tensors, ordered dicts and TorchScript module records."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self.archive, self.prefix = archive, prefix
    self.storages = {}

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGES:
      return _TORCH_STORAGES[name]
    if module.startswith("__torch__"):
      return ModuleRecord
    if module == "builtins" and name in ("set", "frozenset", "slice"):
      return {"set": set, "frozenset": frozenset, "slice": slice}[name]
    raise pickle.UnpicklingError(
        f"Refusing {module}.{name} in a PyTorch archive: only tensors and "
        "module records are read (re-save the weights as a state dict or "
        "safetensors).")

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid[:5]
    if kind != "storage":
      raise pickle.UnpicklingError(f"Unknown persistent id {pid!r}.")
    if key not in self.storages:
      raw = self.archive.read(f"{self.prefix}data/{key}")
      dtype = np.dtype(storage_type)
      self.storages[key] = np.frombuffer(raw, dtype.newbyteorder("<"),
                                         count=numel)
    return self.storages[key]


def _flatten_modules(obj, prefix: str, out: dict) -> None:
  """A TorchScript module tree -> {'a.b.weight': array} (its state dict)."""
  for name, value in obj.attributes.items():
    if isinstance(value, np.ndarray):
      out[prefix + name] = value
    elif isinstance(value, ModuleRecord):
      _flatten_modules(value, f"{prefix}{name}.", out)


def read_torch_zip(path: str) -> dict[str, np.ndarray]:
  """The tensors of a torch.save state dict (or a dict holding one under
  'state_dict' / 'model') or of a TorchScript archive (its module tree's
  parameters and buffers), as {dotted name: array}."""
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")
               and n.count("/") == 1]
    if not pickles:
      raise ValueError(f"{path} has no <name>/data.pkl: not a PyTorch zip "
                       "archive.")
    prefix = pickles[0][:-len("data.pkl")]
    with archive.open(pickles[0]) as f:
      obj = _TorchUnpickler(f, archive, prefix).load()
  if isinstance(obj, ModuleRecord):
    out = {}
    _flatten_modules(obj, "", out)
    return out
  for key in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state "
                     "dict or TorchScript module.")
  tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  # DistributedDataParallel's checkpoints prefix every name with 'module.'.
  if tensors and all(k.startswith("module.") for k in tensors):
    tensors = {k[len("module."):]: v for k, v in tensors.items()}
  return tensors


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of a file or HF model directory (see the module docstring)."""
  if os.path.isdir(path):
    for name in ("model.safetensors", "model.safetensors.index.json",
                 "open_clip_model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)):
        return read_tensors(os.path.join(path, name))
    raise FileNotFoundError(
        f"{path} holds no model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No weights file {path!r}.")
  if path.endswith(".index.json"):
    return read_sharded_safetensors(path)
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if zipfile.is_zipfile(path):
    return read_torch_zip(path)
  raise ValueError(
      f"{path} is neither safetensors nor a PyTorch zip archive (a legacy "
      "pre-1.6 torch file?); re-save it with torch.save or as safetensors.")
