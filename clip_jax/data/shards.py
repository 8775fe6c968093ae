r"""ArrayRecord shards of image-text examples: write once, read at random.

  python -m clip_jax.data.shards write \
      --input 'shards/{00000..00099}.tar' | data.jsonl | data.csv | FOLDER \
      --output DIR --num_shards N [--max_side S] [--workers W]

writes DIR/shard-0000j-of-0000N.array_record (grain's random-access
format, group_size 1 so one record is one read) and DIR/metadata.json
(count, caption statistics, skipped inputs by reason, the inputs). Inputs
are split into N contiguous parts (whole tars, or rows of the JSONL / CSV /
folder listing), each written by one of W processes. A finished shard
leaves DIR/done/shard-0000j.json; running the same command again skips
finished shards (resume after an interruption; other options are refused
in a used DIR). Bad inputs (no image, no caption, a caption that is not
UTF-8, an image PIL cannot decode, a damaged tar) are left out and
counted by reason.

Record (one ArrayRecord record per example, `encode_record`):
  uint32 little-endian n, then n bytes of UTF-8 JSON
  {"key": str, "captions": [str], "format": "jpg"|"png"|..., "label": int
  (optional)}, then the image's encoded bytes as they came (or re-encoded
  as JPEG, quality 95, when --max_side S is given and its longer side is
  larger than S).

Reading: config.data.source='shards', config.data.path=DIR (or a glob of
.array_record files); `ShardsSource` is a grain random-access source, so
the pipeline's global shuffle, per-process split (each process reads only
the records of its rows), skip accounting and checkpointed position hold
as for any source. Paths: array_record 0.8.6 (riegeli's FdReader) opens
local paths only, not gs:// or s3:// (google/array_record issue 120): put
the shards on a local disk or a mounted bucket (gcsfuse, mountpoint-s3).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import io
import json
import multiprocessing
import os
import struct
import sys
import time

from clip_jax.data import wds

FORMAT_VERSION = 1
_HEADER = struct.Struct("<I")
_WRITER_OPTIONS = "group_size:1"  # One record per chunk: cheap random reads.
JPEG_QUALITY = 95


def encode_record(key: str, captions, image: bytes, image_format: str,
                  label: int | None = None) -> bytes:
  meta = {"key": key, "captions": list(captions), "format": image_format}
  if label is not None:
    meta["label"] = int(label)
  header = json.dumps(meta, ensure_ascii=False).encode("utf-8")
  return _HEADER.pack(len(header)) + header + image


def decode_record(data: bytes) -> dict:
  """A pipeline record (image bytes, captions, label?, id) of a record."""
  (n,) = _HEADER.unpack_from(data)
  meta = json.loads(data[_HEADER.size:_HEADER.size + n].decode("utf-8"))
  record = {"image": data[_HEADER.size + n:],
            "captions": meta["captions"], "id": meta["key"]}
  if "label" in meta:
    record["label"] = meta["label"]
  return record


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


# ------------------------------------------------------------- inputs ----


def _input_kind(inputs) -> str:
  if len(inputs) == 1 and (os.path.isdir(inputs[0]) or
                           inputs[0].endswith((".jsonl", ".csv"))):
    return "list"
  return "tars"


def list_inputs(inputs) -> tuple[str, list]:
  """('tars', [tar paths]) or ('list', [records of sources.FileListSource])."""
  if _input_kind(inputs) == "list":
    from clip_jax.data import sources  # pylint: disable=g-import-not-at-top
    return "list", sources.FileListSource(inputs[0]).records
  return "tars", wds.expand_patterns(inputs)


def _part(items: list, index: int, count: int) -> list:
  """Contiguous part `index` of `count` of items."""
  n = len(items)
  return items[index * n // count:(index + 1) * n // count]


def _examples_of_tars(tars):
  """Pipeline records of the samples of tars (bad ones with 'error')."""
  for tar in tars:
    for _, _, key, members in wds.iter_tar_samples(tar):
      yield wds.sample_record(tar, key, members)


def _examples_of_list(records):
  for record in records:
    if record.get("error"):
      yield record
      continue
    try:
      with open(record["image"], "rb") as f:
        image = f.read()
    except OSError as e:
      yield {**record, "image": None, "error": f"{type(e).__name__}: {e}"}
      continue
    ext = os.path.splitext(record["image"])[1].lstrip(".").lower()
    yield {**record, "image": image, "image_format": ext}


# ----------------------------------------------------------- checking ----


def checked_image(data: bytes, max_side: int | None) -> tuple[bytes, str]:
  """(bytes, format) of an image PIL decodes (JPEGs checked at 1/8 scale:
  every entropy-coded byte is still read, at a fraction of the cost);
  re-encoded as JPEG when its longer side exceeds max_side. Raises on an
  image that cannot be used."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from clip_jax.data import transforms  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    fmt = (img.format or "").lower()
    w, h = img.size
    if max_side and max(w, h) > max_side:
      scale = max_side / max(w, h)
      rgb = transforms.decode(data)
      small = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.BICUBIC, reducing_gap=3.0)
      out = io.BytesIO()
      small.save(out, format="JPEG", quality=JPEG_QUALITY)
      return out.getvalue(), "jpg"
    if fmt == "jpeg":
      img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
    elif w * h > transforms.MAX_DECODE_PIXELS:
      raise ValueError(f"the {fmt} image is {w}x{h} px, more than the "
                       "pipeline decodes; give --max_side")
    img.load()
  return data, {"jpeg": "jpg"}.get(fmt, fmt)


@dataclasses.dataclass
class ShardStats:
  """What writing one shard did (saved as its done marker)."""
  index: int
  examples: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)  # reason -> n
  bad_examples: list = dataclasses.field(default_factory=list)  # first few
  captions: int = 0
  caption_chars: int = 0
  caption_words: int = 0
  min_caption_chars: int | None = None
  max_caption_chars: int = 0
  image_bytes: int = 0
  labels: int = 0
  seconds: float = 0.0

  def skip(self, record_id: str, reason: str) -> None:
    short = reason.split(" (")[0].split(":")[0]
    self.skipped[short] = self.skipped.get(short, 0) + 1
    if len(self.bad_examples) < 10:
      self.bad_examples.append([record_id, reason])

  def add(self, captions, image: bytes, label) -> None:
    self.examples += 1
    self.image_bytes += len(image)
    self.labels += label is not None
    for c in captions:
      self.captions += 1
      self.caption_chars += len(c)
      self.caption_words += len(c.split())
      self.max_caption_chars = max(self.max_caption_chars, len(c))
      self.min_caption_chars = len(c) if self.min_caption_chars is None else (
          min(self.min_caption_chars, len(c)))


def _write_shard(kind, items, index, count, output, max_side) -> dict:
  """Writes shard `index` (of `count`) of `items`; returns its stats."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  stats = ShardStats(index)
  part = _part(items, index, count)
  examples = (_examples_of_tars(part) if kind == "tars"
              else _examples_of_list(part))
  path = os.path.join(output, shard_name(index, count))
  writer = array_record_module.ArrayRecordWriter(path + ".tmp",
                                                 _WRITER_OPTIONS)
  try:
    for record in examples:
      record_id = str(record.get("id", ""))
      if record.get("error"):
        stats.skip(record_id, record["error"])
        continue
      captions = [c for c in record.get("captions") or [] if c.strip()]
      if not captions:
        stats.skip(record_id, "no caption")
        continue
      try:
        image, fmt = checked_image(record["image"], max_side)
      except Exception as e:  # noqa: BLE001  PIL raises many kinds.
        stats.skip(record_id, f"bad image ({type(e).__name__}: {e})")
        continue
      label = record.get("label")
      writer.write(encode_record(record_id, captions, image, fmt, label))
      stats.add(captions, image, label)
  finally:
    writer.close()
  os.replace(path + ".tmp", path)
  stats.seconds = time.perf_counter() - start
  done = dataclasses.asdict(stats)
  marker = os.path.join(output, "done", f"shard-{index:05d}.json")
  with open(marker + ".tmp", "w", encoding="utf-8") as f:
    json.dump(done, f, ensure_ascii=False)
  os.replace(marker + ".tmp", marker)  # Written last: the shard is whole.
  return done


def _done(output: str, index: int) -> dict | None:
  marker = os.path.join(output, "done", f"shard-{index:05d}.json")
  if not os.path.exists(marker):
    return None
  with open(marker, encoding="utf-8") as f:
    return json.load(f)


def _check_or_save_settings(output: str, settings: dict) -> None:
  """Refuses to resume into DIR with other inputs or options."""
  path = os.path.join(output, "write_settings.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if saved != settings:
      raise ValueError(
          f"{output} holds shards written with {saved}, not {settings}; "
          "use another --output folder (or delete this one) to write "
          "different shards.")
    return
  with open(path, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=1)


def summarise(shard_stats: list[dict], settings: dict) -> dict:
  """metadata.json: totals over the shards' stats."""
  total = lambda k: sum(s[k] for s in shard_stats)
  examples, captions = total("examples"), total("captions")
  skipped = {}
  for s in shard_stats:
    for reason, n in s["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + n
  mins = [s["min_caption_chars"] for s in shard_stats
          if s["min_caption_chars"] is not None]
  return {
      "format": "clip_jax.data.shards", "version": FORMAT_VERSION,
      "count": examples,
      "shards": [{"file": shard_name(s["index"], settings["num_shards"]),
                  "count": s["examples"]} for s in shard_stats],
      "skipped": skipped, "skipped_total": sum(skipped.values()),
      "bad_examples": [b for s in shard_stats for b in s["bad_examples"]][:20],
      "captions": {
          "total": captions,
          "per_example": captions / examples if examples else 0.0,
          "mean_chars": total("caption_chars") / captions if captions else 0,
          "mean_words": total("caption_words") / captions if captions else 0,
          "min_chars": min(mins) if mins else None,
          "max_chars": max(s["max_caption_chars"] for s in shard_stats)},
      "labelled": total("labels"),
      "image_bytes_mean": total("image_bytes") / examples if examples else 0,
      "source": settings,
  }


def write(inputs, output: str, *, num_shards: int,
          max_side: int | None = None, workers: int | None = None,
          verbose: bool = True) -> dict:
  """Writes the shards not yet done and metadata.json; returns the latter."""
  if isinstance(inputs, str):
    inputs = [inputs]
  if num_shards < 1:
    raise ValueError(f"--num_shards={num_shards} must be >= 1.")
  kind, items = list_inputs(inputs)
  if kind == "tars" and num_shards > len(items):
    raise ValueError(
        f"--num_shards={num_shards} is more than the {len(items)} input "
        f"tars (each output shard takes whole tars); use --num_shards <= "
        f"{len(items)}.")
  os.makedirs(os.path.join(output, "done"), exist_ok=True)
  settings = {"inputs": list(inputs), "kind": kind, "num_inputs": len(items),
              "num_shards": num_shards, "max_side": max_side}
  _check_or_save_settings(output, settings)
  stats = {i: _done(output, i) for i in range(num_shards)}
  todo = [i for i, s in stats.items() if s is None]
  if verbose and len(todo) < num_shards:
    _say(f"resuming: {num_shards - len(todo)} of {num_shards} shards "
         "already written", end="\n")
  workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
  start, written, skipped = time.perf_counter(), 0, 0

  def report(done):
    nonlocal written, skipped
    stats[done["index"]] = done
    written += done["examples"]
    skipped += sum(done["skipped"].values())
    if verbose:
      rate = written / max(time.perf_counter() - start, 1e-9)
      finished = sum(s is not None for s in stats.values())
      _say(f"{finished}/{num_shards} shards: {written} examples written "
           f"({rate:,.0f}/s), {skipped} bad inputs skipped")

  args = [(kind, items, i, num_shards, output, max_side) for i in todo]
  if workers == 1:
    for a in args:
      report(_write_shard(*a))
  else:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers,
                                                mp_context=context) as pool:
      for future in concurrent.futures.as_completed(
          [pool.submit(_write_shard, *a) for a in args]):
        report(future.result())
  metadata = summarise([stats[i] for i in range(num_shards)], settings)
  with open(os.path.join(output, "metadata.json.tmp"), "w",
            encoding="utf-8") as f:
    json.dump(metadata, f, indent=1, ensure_ascii=False)
  os.replace(os.path.join(output, "metadata.json.tmp"),
             os.path.join(output, "metadata.json"))
  if verbose:
    elapsed = time.perf_counter() - start
    reasons = ", ".join(f"{n} {r}" for r, n in metadata["skipped"].items())
    _say(f"wrote {metadata['count']} examples in {num_shards} shards to "
         f"{output} ({written / max(elapsed, 1e-9):,.0f} examples/s this "
         f"run); skipped {metadata['skipped_total']} bad inputs"
         f"{' (' + reasons + ')' if reasons else ''}. Train with "
         f"config.data.source='shards', config.data.path='{output}'.",
         end="\n")
  return metadata


def _say(message: str, end: str = "") -> None:
  print(f"\r{message}", end=end, file=sys.stderr, flush=True)


# ------------------------------------------------------------ reading ----


def shard_paths(path: str) -> list[str]:
  """The .array_record files of a shards folder (its metadata.json's, in
  order) or of a glob pattern."""
  wds.check_local([path])
  metadata = os.path.join(path, "metadata.json")
  if os.path.isdir(path):
    if not os.path.exists(metadata):
      raise FileNotFoundError(
          f"config.data.path={path!r} has no metadata.json: write shards "
          "with `python -m clip_jax.data.shards write --input ... --output "
          f"{path} --num_shards N` (an interrupted write resumes when run "
          "again).")
    with open(metadata, encoding="utf-8") as f:
      files = [s["file"] for s in json.load(f)["shards"]]
    return [os.path.join(path, f) for f in files]
  files = sorted(glob.glob(path))
  if not files:
    raise FileNotFoundError(
        f"config.data.path={path!r} is neither a shards folder nor a "
        "pattern matching .array_record files.")
  return files


class ShardsSource:
  """Records of ArrayRecord shards (random access; pickles as its paths
  for grain's worker processes)."""

  def __init__(self, path: str):
    from grain import sources as grain_sources  # pylint: disable=g-import-not-at-top
    self.path = path
    self.files = shard_paths(path)
    self.data = grain_sources.ArrayRecordDataSource(self.files)
    self.class_names = None

  def __len__(self):
    return len(self.data)

  def __getitem__(self, index):
    try:
      return decode_record(self.data[index])
    except (ValueError, UnicodeDecodeError, struct.error, KeyError) as e:
      return {"id": f"{self.path}#{index}", "image": None, "captions": [],
              "error": f"unreadable record ({type(e).__name__}: {e})"}


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.data.shards",
      description="Write image-text examples as ArrayRecord shards.")
  sub = parser.add_subparsers(dest="command", required=True)
  cmd = sub.add_parser("write", help="tars / JSONL / CSV / folder -> shards")
  cmd.add_argument("--input", required=True, nargs="+",
                   help="tar paths, globs or brace ranges "
                   "('shards/{00000..00099}.tar'), or one .jsonl / .csv / "
                   "folder")
  cmd.add_argument("--output", required=True, help="output folder")
  cmd.add_argument("--num_shards", type=int, required=True)
  cmd.add_argument("--max_side", type=int, default=None,
                   help="re-encode (JPEG) images whose longer side is larger")
  cmd.add_argument("--workers", type=int, default=None,
                   help="processes (default: the CPU count)")
  args = parser.parse_args(argv)
  write(args.input, args.output, num_shards=args.num_shards,
        max_side=args.max_side, workers=args.workers)


if __name__ == "__main__":
  main()

