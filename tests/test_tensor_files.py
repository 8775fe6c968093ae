"""Tensor files read without torch equal what torch / safetensors hold."""

import pickle
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clip_jax import tensor_files  # noqa: E402


def reference_tensors():
  torch.manual_seed(0)
  return {
      "w": torch.randn(4, 3),
      "transposed": torch.randn(5, 6).t(),        # non-contiguous strides
      "sliced": torch.randn(6, 4)[2:, 1:3],       # a storage offset
      "half": torch.randn(7).half(),               # OpenAI's .pt dtype
      "bf16": torch.randn(3, 2).bfloat16(),
      "scalar": torch.tensor(2.5),
      "ids": torch.arange(5),
  }


def as_numpy(t):
  return t.float().numpy() if t.dtype in (torch.half, torch.bfloat16) else (
      t.numpy())


def test_torch_save_state_dict(tmp_path):
  ref = reference_tensors()
  torch.save({"state_dict": ref, "epoch": 3}, tmp_path / "ckpt.pt")
  got = tensor_files.read_tensors(str(tmp_path / "ckpt.pt"))
  assert sorted(got) == sorted(ref)
  for name, value in ref.items():
    assert got[name].shape == tuple(value.shape), name
    np.testing.assert_array_equal(got[name].astype(as_numpy(value).dtype),
                                  as_numpy(value), err_msg=name)


def test_safetensors_both_ways(tmp_path):
  from safetensors.numpy import load_file
  from safetensors.torch import save_file
  ref = {k: v.contiguous() for k, v in reference_tensors().items()}
  save_file(ref, str(tmp_path / "a.safetensors"))
  got = tensor_files.read_tensors(str(tmp_path / "a.safetensors"))
  for name, value in ref.items():
    np.testing.assert_array_equal(got[name].astype(as_numpy(value).dtype),
                                  as_numpy(value), err_msg=name)
  arrays = {k: v for k, v in got.items() if k != "bf16"}
  tensor_files.write_safetensors(str(tmp_path / "b.safetensors"), arrays)
  back = load_file(str(tmp_path / "b.safetensors"))
  for name, value in arrays.items():
    assert back[name].shape == value.shape and back[name].dtype == value.dtype
    np.testing.assert_array_equal(back[name], value, err_msg=name)


class _Evil:
  def __reduce__(self):
    import os
    return (os.system, ("echo pwned",))


def test_refuses_code_in_a_pickle(tmp_path):
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"x": _Evil()}))
  with pytest.raises(pickle.UnpicklingError, match="Refusing posix.system"):
    tensor_files.read_tensors(str(path))
