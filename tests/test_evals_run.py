"""The evaluator registry end to end: image folders, TFDS (mocked),
retrieval through the uniform signature, linear probe, eval periods."""

import os

import closed_form  # tests/closed_form.py: toy towers
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from clip_jax import sharding as sharding_lib
from clip_jax.data import transforms
from clip_jax.evals import readers, run

# Class folders in sorted order -> labels 0..3 -> ClosedFormTowers e_0..e_3.
FOLDERS = ["cat", "golden_retriever", "red_fox", "zebra"]
CLASS_NAMES = ["cat", "golden retriever", "red fox", "zebra"]
COUNTS = [10, 9, 11, 7]  # 37 images: not a multiple of 16 or of 8 devices.


SHUFFLED = (5, 2, 7, 0, 3, 6, 1, 4)


def _mesh(order=tuple(range(8))):
  return sharding_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=4, fsdp=2)), devices=[jax.devices()[i] for i in order])


def _write_folder(root, confused=0, corrupt=True):
  """COUNTS images per class; the first `confused` zebras look like cats."""
  for label, (folder, count) in enumerate(zip(FOLDERS, COUNTS)):
    os.makedirs(os.path.join(root, folder, "nested"))
    for i in range(count):
      k = 0 if (folder == "zebra" and i < confused) else label
      ext = [".png", ".jpg", ".JPEG"][i % 3]
      sub = "nested" if i == 1 else ""
      img = Image.fromarray(closed_form.solid_image(k, size=12)[:, :10])
      img.save(os.path.join(root, folder, sub, f"{i:02d}{ext}"),
               quality=95)
  with open(os.path.join(root, "cat", "notes.txt"), "w") as f:
    f.write("not an image")
  if corrupt:
    with open(os.path.join(root, "red_fox", "broken.png"), "wb") as f:
      f.write(b"not a png")
  os.makedirs(os.path.join(root, ".cache", "x"))
  return root


def _config(evals, **data):
  return ml_collections.ConfigDict(dict(
      batch_size=64,
      data=dict(image_size=8, mean=transforms.CLIP_MEAN,
                std=transforms.CLIP_STD, source="emoji", split="train",
                context_length=2, **data),
      evals=evals))


def test_class_folder_source(tmp_path):
  root = _write_folder(str(tmp_path))
  source = readers.ClassFolderSource(root)
  assert source.class_names == CLASS_NAMES
  labels = [source[i]["label"] for i in range(len(source))]
  assert len(source) == sum(COUNTS) + 1  # + the corrupt file.
  assert labels == sorted(labels)
  assert np.bincount(labels).tolist() == [10, 9, 12, 7]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    readers.ClassFolderSource(str(tmp_path / "missing"))


def test_reader_batches_pad_mask_and_count_unreadable(tmp_path):
  root = _write_folder(str(tmp_path))
  source = readers.ClassFolderSource(root)
  make = lambda image: transforms.normalize(
      transforms.preprocess_image(image, 8))
  for threads in (0, 3):
    batches = list(readers.record_batches(source, make, 16,
                                          num_threads=threads))
    assert [len(b["mask"]) for b in batches] == [16, 16, 16]
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert mask.sum() == 37 and sum(b["num_skipped"].sum()
                                    for b in batches) == 1
    assert index[:38].tolist() == list(range(38))
    assert (index[38:] == -1).all() and (mask[38:] == 0).all()
  # rows: only those images are decoded; every other entry covers the
  # whole batch, the same as without rows.
  calls = []

  def counting(image):
    calls.append(1)
    return make(image)

  rows = np.array([3, 0, 9, 15])
  full = list(readers.record_batches(source, make, 16))
  mine = list(readers.record_batches(source, counting, 16, rows=rows,
                                     image_shape=(8, 8, 3), num_threads=2))
  decodable = 37 + 1  # Real rows of the three batches (one corrupt).
  assert len(calls) == sum(int(r < n) for n in (16, 16, decodable - 32)
                           for r in rows) < decodable / 3
  for a, b in zip(full, mine):
    np.testing.assert_array_equal(b["image"], a["image"][rows])
    np.testing.assert_array_equal(b["image_rows"], rows)
    np.testing.assert_array_equal(b["index"], a["index"])
    real = a["mask"] > 0
    np.testing.assert_array_equal(b["label"][real], a["label"][real])
    np.testing.assert_array_equal(b["image_mask"] > 0, real[rows])
    # Without rows the corrupt file is masked by the reader; with rows,
    # 'mask' covers the records (all readable here) and 'image_mask' the
    # decoding, which embed_batches combines over processes.
    np.testing.assert_array_equal(b["mask"], b["index"] >= 0)
  # Nothing readable at all is an error naming the first failure.
  bad = tmp_path / "bad" / "cls"
  bad.mkdir(parents=True)
  (bad / "a.png").write_bytes(b"nope")
  with pytest.raises(ValueError, match="None of the 1 examples.*example 0"):
    list(readers.record_batches(readers.ClassFolderSource(str(bad.parent)),
                                make, 4))


@pytest.mark.parametrize("order", [tuple(range(8)), SHUFFLED])
def test_zeroshot_on_an_image_folder_with_side_by_side_templates(tmp_path,
                                                                 order):
  root = _write_folder(str(tmp_path), confused=2)
  evals = {"folder": dict(type="zeroshot", templates=["none", "clip_imagenet"],
                          dataset=dict(source="image_folder", path=root),
                          topk=(1, 3, 4), per_class=True, batch_size=16)}
  out = run.run_all(_config(evals), closed_form.ClosedFormTowers(), {},
                    _mesh(order), tokenize=closed_form.tokenize_fn(CLASS_NAMES))
  # Two zebras embed as e_0 (cat): class 0 scores 1, classes 1-3 tie at 0,
  # so their label 3 ranks 4th (ties -> lower class index first).
  for prefix in ("none", "clip_imagenet"):
    p = f"eval/folder/{prefix}"
    assert out[f"{p}/top1"] == pytest.approx(35 / 37)
    assert out[f"{p}/top3"] == pytest.approx(35 / 37)
    assert out[f"{p}/top4"] == 1.0
    assert out[f"{p}/per_class/zebra"] == pytest.approx(5 / 7)
    assert out[f"{p}/per_class/golden retriever"] == 1.0
    assert out[f"{p}/mean_per_class"] == pytest.approx((3 + 5 / 7) / 4)
  assert out["eval/folder/num_images"] == 37
  assert out["eval/folder/num_skipped"] == 1
  assert out["eval/folder/seconds"] > 0


def test_zeroshot_class_names_from_tfds_metadata():
  tfds = pytest.importorskip("tensorflow_datasets")
  evals = {"mnist": dict(type="zeroshot", templates="none", topk=(10,),
                         batch_size=16,
                         dataset=dict(source="tfds", tfds_name="mnist",
                                      split="test"))}
  config = _config(evals)
  seen = []
  with tfds.testing.mock_data(num_examples=21):
    make_batches = run.make_batches_fn(config.data, batch_size=16)
    data = make_batches(evals["mnist"]["dataset"])
    assert data.class_names == [str(d) for d in range(10)]
    batches = list(data)
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    source = tfds.data_source("mnist", split="test")
    assert mask.sum() == 21 and (mask[21:] == 0).all()
    assert labels[:21].tolist() == [int(source[i]["label"])
                                    for i in range(21)]

    def tokenize(texts):
      seen.extend(texts)
      return np.stack([[int(t), 0] for t in texts]).astype(np.int32)

    out = run.run_all(config, closed_form.ClosedFormTowers(dim=10), {}, _mesh(),
                      tokenize=tokenize)
  assert seen == [str(d) for d in range(10)]  # Names from the metadata.
  assert out["eval/mnist/num_images"] == 21
  assert out["eval/mnist/top10"] == 1.0


def test_retrieval_through_the_uniform_signature():
  # Images embed as e_0, e_1, e_2, e_3, e_0 (image 3 has no caption).
  # Captions (tilt 0: a caption of class k embeds exactly as e_k):
  #   c0 'cat' -> image 0; c1 'dog', c2 'a dog' -> image 1;
  #   c3 'emu' -> image 2; c4 'cat photo' -> image 4.
  # i2t: image 0 -> c0 first (rank 1); image 1 -> c1 (1); image 2 -> c3
  #   (1); image 4 -> c0 and c4 tie, c0 (not its own) first -> rank 2.
  #   Image 3 is no query. -> r@1 = 3/4, mean rank 5/4.
  # t2i: c0 -> images 0 and 4 tie, image 0 first (own) -> 1; c1, c2 -> 1;
  #   c3 -> 1; c4 -> image 0 first, own image 4 second -> 2.
  #   -> r@1 = 4/5, mean rank 6/5.
  norm = lambda k: transforms.normalize(closed_form.solid_image(k))
  batch = {
      "image": np.stack([norm(k) for k in (0, 1, 2, 3, 0, 0)]),
      "mask": np.array([1, 1, 1, 1, 1, 0], np.float32),
      "label": -np.ones(6, np.int32),
      "captions": [["cat"], ["dog", "a dog"], ["emu"], [], ["cat photo"],
                   ["cat"]],  # The last row is padding: not counted.
  }
  calls = []

  def make_batches(dataset, *, captions=False):
    calls.append((dataset, captions))
    return [batch]

  out = run.EVALUATORS["retrieval"](
      {"type": "retrieval", "split": "val", "ks": (1, 2)},
      model=closed_form.ClosedFormTowers(tilt=0.0), params={}, mesh=_mesh(),
      tokenize=closed_form.tokenize_fn(["cat", "dog", "emu", "fox"]),
      make_batches=make_batches)
  assert calls == [({"split": "val"}, True)]
  want = {"i2t/r@1": 3 / 4, "i2t/r@2": 1.0, "i2t/mean_rank": 5 / 4,
          "i2t/median_rank": 1.0, "t2i/r@1": 4 / 5, "t2i/r@2": 1.0,
          "t2i/mean_rank": 6 / 5, "t2i/median_rank": 1.0,
          "num_images": 4, "num_captions": 5, "num_skipped": 0}
  assert out == pytest.approx(want)


def test_linear_probe_on_image_folders(tmp_path):
  train = _write_folder(str(tmp_path / "train"), corrupt=False)
  test = _write_folder(str(tmp_path / "test"), confused=2, corrupt=False)
  evals = {"probe": dict(
      type="linear_probe", batch_size=16,
      train_split=dict(source="image_folder", path=train),
      test_split=dict(source="image_folder", path=test))}
  out = run.run_all(_config(evals), closed_form.ClosedFormTowers(dim=12), {},
                    _mesh())
  # Train features are one-hot per class: the probe learns the identity;
  # the two confused test zebras are predicted as cats.
  assert out["eval/probe/train_accuracy"] == 1.0
  assert out["eval/probe/accuracy"] == pytest.approx(35 / 37)
  assert out["eval/probe/num_train"] == 37


def test_due_periods_in_steps_examples_and_epochs():
  evals = {"a": dict(type="zeroshot", split="v", every_steps=100),
           "b": dict(type="zeroshot", split="v", every_examples=1000),
           "c": dict(type="retrieval", split="v", every_epochs=0.5),
           "d": dict(type="retrieval", split="v")}
  config = _config(evals)
  # batch 64: 1000 examples -> every 16 steps; half an epoch of 1280
  # examples -> every 10 steps.
  due = lambda step: run.due(config, step, 250, dataset_size=1280)
  assert due(0) == ["a", "b", "c", "d"]
  assert due(250) == ["a", "b", "c", "d"]
  assert due(100) == ["a", "c"]
  assert due(160) == ["b", "c"]
  assert due(16) == ["b"]
  assert due(7) == []
  with pytest.raises(ValueError, match="needs the dataset size"):
    run.due(config, 10, 250)
  run.validate(config)  # Epochs are checked only with a dataset size.
  run.validate(config, dataset_size=1280)


@pytest.mark.parametrize("evals, message", [
    ({"x": dict(type="zeroshot", split="v", templtes="none")},
     r"unknown keys \['templtes'\].*valid: .*'templates'"),
    ({"x": dict(type="knn", split="v")}, r"'knn' is not one of \['"
     r"linear_probe', 'retrieval', 'zeroshot'\]"),
    ({"x": dict(type="zeroshot", split="v", every_steps=1,
                every_examples=2)}, "at most one of"),
    ({"x": dict(type="zeroshot")}, r"set dataset.split"),
    ({"x": dict(type="zeroshot", split="v", templates="nope")},
     "Unknown template set 'nope'"),
    ({"x": dict(type="linear_probe", train_split="train")},
     "needs test_split"),
])
def test_validate_names_the_bad_value(evals, message):
  with pytest.raises(ValueError, match=message):
    run.validate(_config(evals))
