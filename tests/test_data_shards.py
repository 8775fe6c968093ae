"""ArrayRecord shards and the WebDataset source, from a synthetic tar set.

The tars are made here with tarfile: good JPEG and PNG samples whose pixel
value and caption encode their number, plus bad samples (corrupt, empty
and non-image images, a missing and a blank caption, a non-UTF-8 caption,
a missing image) and a damaged tar. References: the good sample numbers
(known by construction); grain's shuffle of the record indices (the order
of a plain range dataset of that length with the seed); the documented
shuffle-buffer algorithm re-run in NumPy for the wds order.
"""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import pipeline, shards, wds

NUM_TARS = 4
PER_TAR = 9  # Samples per tar; 8 of the 36 are bad (_bad_kind): 28 good.


def _image_bytes(number: int, fmt: str) -> bytes:
  # Pixel value = number: the batch's pixels tell which example it is.
  buf = io.BytesIO()
  Image.new("RGB", (12, 10), (number, number, number)).save(
      buf, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _noise_bytes(number: int, fmt: str) -> bytes:
  pixels = np.random.default_rng(number).integers(0, 256, (64, 64, 3))
  buf = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def _bad_kind(number: int) -> str | None:
  """Which samples are bad, and how (the rest are good)."""
  return {2: "corrupt image", 7: "missing caption", 12: "non-UTF-8 text",
          15: "blank caption", 20: "missing image", 24: "empty image",
          29: "corrupt image", 33: "not an image"}.get(number)


def _add(tar, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_tars(folder, num_tars=NUM_TARS, per_tar=PER_TAR):
  """Tars 00000.tar ... and the numbers of the good samples."""
  good = []
  for t in range(num_tars):
    with tarfile.open(os.path.join(folder, f"{t:05d}.tar"), "w") as tar:
      for i in range(per_tar):
        number = t * per_tar + i
        key = f"{number:06d}"
        kind = _bad_kind(number)
        fmt = "PNG" if number % 2 else "JPEG"
        image = _image_bytes(number * 4, fmt)
        if kind == "corrupt image":  # Its header reads; its pixels do not.
          image = _noise_bytes(number, fmt)
          image = image[:len(image) * 2 // 3]
        image = {"empty image": b"", "not an image": b"GIF89a?" * 9}.get(
            kind, image)
        if kind != "missing image":
          _add(tar, f"{key}.{'png' if fmt == 'PNG' else 'jpg'}", image)
        caption = f"photo {number}".encode()
        if kind == "non-UTF-8 text":
          caption = b"caf\xe9 " + caption
        if kind == "blank caption":
          caption = b"  \n \n"
        if kind != "missing caption":
          _add(tar, f"{key}.txt", caption)
        _add(tar, f"{key}.cls", str(number).encode())
        if kind is None:
          good.append(number)
  return good


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tars")
  good = make_tars(str(folder))
  return str(folder), good


@pytest.fixture(scope="module")
def shard_dir(tars, tmp_path_factory):
  folder, _ = tars
  out = str(tmp_path_factory.mktemp("shards"))
  shards.write(os.path.join(folder, "{00000..00003}.tar"), out,
               num_shards=2, workers=1, verbose=False)
  return out


class CaptionNumberTokenizer:
  """'photo N' -> [N + 1, 1, 0, ...]: the batch's text says the example."""

  vocab_size = 1000

  def encode(self, texts, context_length, eos_policy):
    del eos_policy
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      out[row, :2] = [int(text.split()[-1]) + 1, 1]
    return out


def _config(**overrides):
  config = pipeline.default_data_config()
  config.update(image_size=8, context_length=4, prefetch=0,
                max_skip_fraction=0.5, tokenizer="unused")
  config.update(overrides)
  return config


def _numbers(batch):
  return [int(t) - 1 for t in batch["text"][:, 0]]


def test_metadata_counts_good_and_bad(shard_dir, tars):
  _, good = tars
  with open(os.path.join(shard_dir, "metadata.json")) as f:
    meta = json.load(f)
  assert meta["count"] == len(good) == sum(s["count"] for s in meta["shards"])
  assert meta["skipped_total"] == 8
  assert meta["skipped"] == {"bad image": 4, "no caption": 2,
                             "the caption is not UTF-8": 1,
                             "no image member": 1}
  assert meta["captions"]["per_example"] == 1.0
  lengths = [len(f"photo {n}") for n in good]
  assert meta["captions"]["mean_chars"] == pytest.approx(np.mean(lengths))
  assert meta["captions"]["max_chars"] == max(lengths)
  assert meta["labelled"] == len(good)


def test_records_keep_bytes_captions_labels(shard_dir, tars):
  folder, good = tars
  source = shards.ShardsSource(shard_dir)
  records = [source[i] for i in range(len(source))]
  # Whole tars per shard, in input order: the good samples in order.
  assert [r["label"] for r in records] == good
  for r in records:
    assert r["captions"] == [f"photo {r['label']}"]
  # The image bytes are the tar member's, unchanged.
  with tarfile.open(os.path.join(folder, "00000.tar")) as tar:
    member = tar.extractfile("000000.jpg").read()
  assert records[0]["image"] == member


def test_write_resumes_and_refuses_other_settings(tars, tmp_path):
  folder, good = tars
  pattern = os.path.join(folder, "*.tar")
  out = str(tmp_path / "out")
  shards.write(pattern, out, num_shards=4, workers=1, verbose=False)
  first = open(os.path.join(out, shards.shard_name(1, 4)), "rb").read()
  # An interrupted run: shard 2 lost its marker and file; shard 1 is kept.
  os.remove(os.path.join(out, "done", "shard-00002.json"))
  os.remove(os.path.join(out, shards.shard_name(2, 4)))
  mtime = os.path.getmtime(os.path.join(out, shards.shard_name(1, 4)))
  meta = shards.write(pattern, out, num_shards=4, workers=1, verbose=False)
  assert meta["count"] == len(good)
  assert os.path.getmtime(os.path.join(out, shards.shard_name(1, 4))) == mtime
  assert open(os.path.join(out, shards.shard_name(1, 4)), "rb").read() == first
  with pytest.raises(ValueError, match="another --output"):
    shards.write(pattern, out, num_shards=3, workers=1, verbose=False)


def test_bucket_urls_are_refused_with_what_to_do():
  for source in ("shards", "wds"):
    config = _config(source=source, path="gs://bucket/data/*")
    with pytest.raises(ValueError, match="local paths only.*mount"):
      pipeline.make_dataset(config, split="train", batch_size_per_process=1,
                            seed=0, tokenizer=CaptionNumberTokenizer())


def test_max_side_reencodes_large_images(tmp_path):
  with tarfile.open(tmp_path / "00000.tar", "w") as tar:
    big = io.BytesIO()
    Image.new("RGB", (100, 40), (200, 10, 10)).save(big, format="PNG")
    _add(tar, "a.png", big.getvalue())
    _add(tar, "a.txt", b"red")
    _add(tar, "b.png", _image_bytes(9, "PNG"))
    _add(tar, "b.txt", b"grey")
  shards.write(str(tmp_path / "00000.tar"), str(tmp_path / "out"),
               num_shards=1, max_side=50, workers=1, verbose=False)
  source = shards.ShardsSource(str(tmp_path / "out"))
  a, b = (Image.open(io.BytesIO(source[i]["image"])) for i in range(2))
  assert a.format == "JPEG" and a.size == (50, 20)
  assert np.abs(np.asarray(a).astype(int) - (200, 10, 10)).max() <= 8
  assert b.format == "PNG" and b.size == (12, 10)  # Small: as it came.


def _read_all(config, process_count, batch_per_process, seed=0,
              num_epochs=1):
  """Per process: its batches of one epoch."""
  out = []
  for p in range(process_count):
    with pipeline.make_dataset(
        config, split="train", batch_size_per_process=batch_per_process,
        seed=seed, tokenizer=CaptionNumberTokenizer(), shard_index=p,
        shard_count=process_count, num_epochs=num_epochs) as iterator:
      out.append((list(iterator), iterator.num_skipped))
  return out


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_shards_every_good_example_once_per_epoch(shard_dir, tars,
                                                  processes):
  _, good = tars
  config = _config(source="shards", path=shard_dir)
  per_process = 4 // processes
  runs = _read_all(config, processes, per_process)
  single = _read_all(config, 1, 4)[0][0]
  numbers = [n for batches, _ in runs for b in batches for n in _numbers(b)]
  # 28 records (the 8 bad were left out when writing): 7 full global
  # batches of 4, every good example exactly once.
  assert sorted(numbers) == good and len(good) == 28
  # The images are the examples' own (pixel value 4 * number; JPEG +-3).
  for batches, _ in runs:
    for b in batches:
      assert np.abs(b["image"][:, 4, 4, 0].astype(int) -
                    4 * np.array(_numbers(b))).max() <= 3
      np.testing.assert_array_equal(b["label"], _numbers(b))
  # Process-ordered concatenation = the single-process global batch.
  for step, batch in enumerate(single):
    joined = [n for batches, _ in runs for n in _numbers(batches[step])]
    assert joined == _numbers(batch)
  # In the seed's order: grain's shuffle of the 28 record indices.
  order = [good[i] for i in _grain_order(len(good), seed=0)]
  assert [n for b in single for n in _numbers(b)] == order


def test_shards_each_process_reads_only_its_rows(shard_dir, monkeypatch):
  read = []
  original = shards.ShardsSource.__getitem__
  monkeypatch.setattr(shards.ShardsSource, "__getitem__",
                      lambda self, i: read.append(i) or original(self, i))
  config = _config(source="shards", path=shard_dir)
  per_process = []
  for p in range(2):
    read.clear()
    _read_all_one(config, p, 2)
    per_process.append(list(read))
  # The records of each process's rows: the seed's order, blocks of 2 of
  # every global batch of 4 (14 x 2 rows of the 28 records).
  order = _grain_order(28, seed=0)
  for p, indices in enumerate(per_process):
    assert indices == [order[i] for i in range(28) if (i // 2) % 2 == p]


def _read_all_one(config, p, count):
  with pipeline.make_dataset(
      config, split="train", batch_size_per_process=2, seed=0,
      tokenizer=CaptionNumberTokenizer(), shard_index=p, shard_count=count,
      num_epochs=1) as iterator:
    return list(iterator)


def _grain_order(n, seed):
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.range(n).seed(seed).shuffle()
  return [ds[i] for i in range(n)]


def test_shards_bad_records_are_counted(tmp_path, tars):
  # A shard with a record that is not one of ours: read, skipped, counted.
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "x.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for n in range(8):
    writer.write(shards.encode_record(f"k{n}", [f"photo {n}"],
                                      _image_bytes(4 * n, "PNG"), "png", n))
  writer.write(b"\x05\x00")  # Truncated header.
  writer.write(shards.encode_record("bad", ["photo 99"], b"not an image",
                                    "png"))
  writer.close()
  config = _config(source="shards", path=str(tmp_path / "*.array_record"))
  (batches, skipped), = _read_all(config, 1, 2)  # 10 records: 5 batches.
  assert skipped == 2
  assert sorted(n for b in batches for n in _numbers(b)) == list(range(8))
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 2


def test_shards_resume_mid_epoch_is_bit_exact(shard_dir):
  config = _config(source="shards", path=shard_dir, worker_count=0,
                   random_resized_crop=(0.5, 1.0), prefetch=2)
  kwargs = dict(split="train", batch_size_per_process=3, seed=5,
                tokenizer=CaptionNumberTokenizer())
  with pipeline.make_dataset(config, **kwargs) as iterator:
    for _ in range(4):
      next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(12)]  # Past the epoch end.
  with pipeline.make_dataset(config, **kwargs) as restored:
    restored.set_state(state)
    got = [next(restored) for _ in range(12)]
  for a, b in zip(expected, got):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------- wds ----


def test_brace_expansion_and_tar_samples(tars):
  folder, _ = tars
  files = wds.expand_patterns(os.path.join(folder, "{00001..00002}.tar"))
  assert [os.path.basename(f) for f in files] == ["00001.tar", "00002.tar"]
  assert wds.expand_braces("a{0..2}{x,y}") == [
      "a0x", "a0y", "a1x", "a1y", "a2x", "a2y"]
  items = list(wds.iter_tar_samples(files[0]))
  assert [k for _, _, k, _ in items] == [f"{n:06d}" for n in range(9, 18)]
  # Each sample starts where the previous one said the next starts, and
  # reading from that offset gives it again.
  for (_, nxt, _, _), (start, _, key, members) in zip(items, items[1:]):
    assert nxt == start
    assert wds.read_sample_at(files[0], start) == (key, members)


def test_wds_shard_assignment_is_deterministic_and_disjoint():
  for k in (1, 2, 4):
    for epoch in (0, 1):
      parts = [wds.process_shards(10, seed=3, epoch=epoch, process_index=p,
                                  process_count=k) for p in range(k)]
      assert sorted(i for part in parts for i in part) == list(range(10))
      assert parts == [wds.process_shards(10, seed=3, epoch=epoch,
                                          process_index=p, process_count=k)
                       for p in range(k)]
  # Epochs reshuffle the shards; the permutation is NumPy's of (seed, e).
  e0 = wds.process_shards(10, seed=3, epoch=0, process_index=0,
                          process_count=1)
  assert e0 == list(np.random.default_rng([3, 0]).permutation(10))
  assert e0 != wds.process_shards(10, seed=3, epoch=1, process_index=0,
                                  process_count=1)


def _wds_numbers(config, processes, batch=1, seed=0):
  out, skipped = [], 0
  for p in range(processes):
    with pipeline.make_dataset(
        config, split="train", batch_size_per_process=batch, seed=seed,
        tokenizer=CaptionNumberTokenizer(), shard_index=p,
        shard_count=processes, num_epochs=1) as iterator:
      out.append([n for b in iterator for n in _numbers(b)])
      skipped += iterator.num_skipped
  return out, skipped


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_wds_every_good_member_once_per_epoch(tars, processes):
  folder, good = tars
  config = _config(source="wds", path=os.path.join(folder, "*.tar"),
                   shuffle_buffer=5)
  numbers, skipped = _wds_numbers(config, processes)
  flat = [n for part in numbers for n in part]
  assert sorted(flat) == good
  assert skipped == 8
  # Process p reads exactly its shards' good samples.
  for p, part in enumerate(numbers):
    mine = wds.process_shards(NUM_TARS, seed=0, epoch=0, process_index=p,
                              process_count=processes)
    assert sorted(part) == [n for n in good if n // PER_TAR in mine]
  # The order: the documented shuffle buffer (fill to 5, emit a random
  # one drawn by PCG64(seed, process), put the last in its place) over the
  # process's shards in their epoch order, bad samples included.
  for p, part in enumerate(numbers):
    assert part == _buffer_order_reference(processes, p, buffer=5, seed=0)
  if processes == 1:
    assert flat != sorted(flat)
    assert _wds_numbers(config, 1, seed=1)[0] != numbers


def _buffer_order_reference(processes, p, buffer, seed):
  mine = np.random.default_rng([seed, 0]).permutation(NUM_TARS)[p::processes]
  stream = [t * PER_TAR + i for t in mine for i in range(PER_TAR)]
  rng = np.random.Generator(np.random.PCG64([seed, p]))
  held, out = [], []
  while stream or held:
    while stream and len(held) < buffer:
      held.append(stream.pop(0))
    j = int(rng.integers(len(held)))
    out.append(held[j])
    held[j] = held[-1]
    held.pop()
  return [n for n in out if _bad_kind(n) is None]


def test_wds_damaged_tar_is_counted(tars, tmp_path):
  folder, good = tars
  intact = os.path.join(folder, "00001.tar")
  for name in ("00000.tar", "00002.tar"):
    os.symlink(os.path.join(folder, name), tmp_path / name)
  # Cut inside the image of the tar's third sample (number 11): samples 9
  # and 10 are read, then the damage is one bad example.
  third = [start for start, _, _, _ in wds.iter_tar_samples(intact)][2]
  data = open(intact, "rb").read()
  (tmp_path / "00001.tar").write_bytes(data[:third + 512 + 100])
  config = _config(source="wds", path=str(tmp_path / "*.tar"),
                   shuffle_buffer=4)
  (numbers,), skipped = _wds_numbers(config, 1)
  kept = [n for n in good if n // PER_TAR in (0, 2)] + [9, 10]
  assert sorted(numbers) == sorted(kept)
  # Bad samples 2, 7, 20, 24, sample 11 (its image only), the damage.
  assert skipped == 4 + 2
  # A restore from any batch gives the rest, skips counted the same.
  kwargs = dict(split="train", batch_size_per_process=1, seed=0,
                tokenizer=CaptionNumberTokenizer(), num_epochs=1)
  with pipeline.make_dataset(config, **kwargs) as iterator:
    states = [iterator.get_state()]
    for _ in numbers:
      next(iterator)
      states.append(iterator.get_state())
  for step, state in enumerate(states):
    with pipeline.make_dataset(config, **kwargs) as restored:
      restored.set_state(state)
      rest = [n for b in restored for n in _numbers(b)]
      assert rest == numbers[step:] and restored.num_skipped == skipped


def test_wds_resume_restores_position_bit_exact(tars):
  folder, _ = tars
  config = _config(source="wds", path=os.path.join(folder, "*.tar"),
                   shuffle_buffer=6, random_resized_crop=(0.5, 1.0),
                   worker_count=2, prefetch=2)
  kwargs = dict(split="train", batch_size_per_process=4, seed=2,
                tokenizer=CaptionNumberTokenizer(), shard_index=1,
                shard_count=2)
  with pipeline.make_dataset(config, **kwargs) as iterator:
    # 10 x 4 examples: the second chunk of pipeline.CHUNK = 32 (process 1
    # reads ~18 samples an epoch), so the saved reader has a full buffer.
    for _ in range(10):
      next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(8)]  # Into the next epochs.
  saved = json.loads(state)
  # The buffer (6, less the sample just emitted) is read again.
  assert len(saved["position"]["reader"]["buffer"]) == 5
  assert saved["position"]["skip"] == saved["consumed"] - pipeline.CHUNK
  config.worker_count = 0  # Threads do not change the batches.
  with pipeline.make_dataset(config, **kwargs) as restored:
    restored.set_state(state)
    got = [next(restored) for _ in range(8)]
  for a, b in zip(expected, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pipeline.make_dataset(config, **{**kwargs, "seed": 3}) as other:
    with pytest.raises(ValueError, match="seed"):
      other.set_state(state)


# ------------------------------------------------------- JPEG decoders ----


def _smooth_jpeg(width=640, height=480, mode="RGB") -> bytes:
  y, x = np.mgrid[0:height, 0:width] / 40.0
  pixels = np.stack([128 + 100 * np.sin(x), 128 + 100 * np.cos(y),
                     128 + 60 * np.sin(x + y)], -1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


@pytest.mark.parametrize("decoder", ["pillow_draft", "simplejpeg"])
def test_reduced_jpeg_decode_gives_the_same_crops(decoder, monkeypatch):
  from clip_jax.data import transforms  # pylint: disable=g-import-not-at-top
  data = _smooth_jpeg()
  decoded = []
  original = transforms.decode_jpeg_at_least
  monkeypatch.setattr(transforms, "decode_jpeg_at_least",
                      lambda *a: decoded.append(original(*a)) or decoded[-1])
  for seed in range(6):
    # Small crops (5-30% of the area) are where too small a scale shows.
    kwargs = dict(crop_scale=(0.05, 0.3)) if seed else {}  # 0: centre.
    rng = None if seed == 0 else np.random.default_rng(seed)
    rng_full = None if seed == 0 else np.random.default_rng(seed)
    reference, scale = transforms.augment_geometry(data, 32, rng_full,
                                                   **kwargs)
    got, got_scale = transforms.augment_geometry(data, 32, rng,
                                                 jpeg_decoder=decoder,
                                                 **kwargs)
    assert got.shape == reference.shape == (32, 32, 3)
    assert got_scale == scale  # The same crop (and blur scale).
    if rng is not None:  # The same draws were made.
      assert rng.random() == rng_full.random()
    diff = np.abs(got.astype(int) - reference.astype(int))
    # Measured: mean 0.3-0.4, 99th percentile 1 (resampling differences).
    assert diff.mean() < 1 and np.percentile(diff, 99) <= 3, diff.mean()
    if rng is not None:  # The crop keeps >= 32 decoded px a side.
      box = transforms.random_resized_crop_box(
          640, 480, np.random.default_rng(seed), scale=(0.05, 0.3))
      side = min(box[2] - box[0], box[3] - box[1])
      assert side * decoded[-1].width / 640 >= 32
  # Decoded smaller than 640 x 480 (the centre crop too: 480 -> >= 32).
  assert all(img.width < 640 for img in decoded) and len(decoded) == 6


@pytest.mark.parametrize("decoder", ["pillow_draft", "simplejpeg"])
def test_reduced_jpeg_decode_falls_back_and_rejects(decoder):
  from clip_jax.data import transforms  # pylint: disable=g-import-not-at-top
  for mode in ("CMYK", "L"):  # simplejpeg refuses CMYK; draft keeps L.
    data = _smooth_jpeg(mode=mode)
    reference, _ = transforms.augment_geometry(data, 16)
    got, _ = transforms.augment_geometry(data, 16, jpeg_decoder=decoder)
    # Measured: 0 (CMYK: Pillow's full decode), 1.1 (grey at 1/8 scale).
    assert np.abs(got.astype(int) - reference.astype(int)).mean() < 2
  data = _smooth_jpeg()
  with pytest.raises(Exception):  # noqa: B017  Any error: a bad example.
    transforms.augment_geometry(data[:len(data) // 2], 16,
                                jpeg_decoder=decoder)
