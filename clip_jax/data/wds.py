r"""WebDataset tar shards: reading samples, and the streaming 'wds' source.

A WebDataset (img2dataset) shard is a tar whose consecutive members with
the same key (member path up to the first dot of its file name) form one
sample: {key}.jpg (or .jpeg/.png/.webp/.gif/.bmp), {key}.txt (captions,
one a line), optionally {key}.cls (an integer class label). Read with
`tarfile` (the standard library): it can start at any member's byte offset,
which is what an exact resume needs (the `webdataset` package streams from
the start of a shard; see clip_jax/data/bench.py for the speeds).

Shard lists: `expand_patterns('shards/{00000..00099}.tar')` expands braces
(numeric ranges keep their zero padding; {a,b} lists) and globs, sorted.

The 'wds' training source (config.data.source='wds', config.data.path =
a shard pattern), `WdsReader`:
  - epoch e's shard order is a permutation drawn from (seed, e); process
    p of k reads every k-th shard of it from the p-th: deterministic, and
    each shard is read by one process per epoch;
  - samples pass a shuffle buffer of config.data.shuffle_buffer samples
    (fill, then emit a random one and put the next sample in its place),
    drawn from a numpy PCG64 generator seeded with (seed, p);
  - the position (epoch, shard cursor, byte offset of the next sample, the
    buffered samples' (shard, offset) and the generator's state) is saved
    in the checkpoint: a restore re-reads the buffered samples at their
    offsets, so the following batches are the same bit for bit;
  - a sample without an image or a .txt, with a .txt that is not UTF-8, or
    an image that cannot be decoded is a bad example (skipped and counted
    by the pipeline); a damaged shard gives one bad example and the reader
    goes on with the next shard.
Not exact: the processes do not make one global order (each reads its own
shards, so the global batch differs with the process count), and an epoch
of a process is its own shards (processes with fewer shards start their
next epoch sooner); a state restores only with the same shard list, seed,
buffer size and process count.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import re
import tarfile

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
DAMAGED = -1  # The offset of a shard's damage report (not a byte offset).
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """'a{00..02}b{x,y}' -> a00bx, a00by, a01bx, ... (ranges keep the
  zero padding of their first bound)."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    lo, hi = numeric.groups()
    width = len(lo) if lo.startswith("0") else 0
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    options = body.split(",")
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [expanded for option in options
          for expanded in expand_braces(head + option + tail)]


def expand_patterns(patterns) -> list[str]:
  """Sorted existing files matching brace patterns / globs; raises if
  none does."""
  if isinstance(patterns, str):
    patterns = [patterns]
  check_local(patterns)
  files = sorted({f for p in patterns for e in expand_braces(p)
                  for f in (glob.glob(e) if glob.has_magic(e) else
                            [e] if os.path.isfile(e) else [])})
  if not files:
    raise FileNotFoundError(
        f"No tar shards match {list(patterns)}; give existing files, a glob "
        "('shards/*.tar') or a brace range ('shards/{00000..00099}.tar').")
  return files


def check_local(paths) -> None:
  """Bucket URLs are refused with what to do instead."""
  remote = [p for p in paths if re.match(r"^[a-z][a-z0-9+.-]*://", str(p))]
  if remote:
    raise ValueError(
        f"{remote[0]!r} is a bucket URL; clip_jax reads tars and ArrayRecord "
        "shards from local paths only (array_record 0.8.6 opens local files, "
        "google/array_record#120). Copy the shards to a local disk or mount "
        "the bucket (gcsfuse, mountpoint-s3) and give the local path.")


def _member_key(name: str) -> tuple[str, str]:
  """'dir/000012.jpg' -> ('dir/000012', 'jpg'); the key ends at the first
  dot of the file name (WebDataset's rule), extensions are lower-cased."""
  folder, filename = os.path.split(name)
  key, _, ext = filename.partition(".")
  return os.path.join(folder, key), ext.lower()


def iter_tar_samples(path: str, offset: int = 0):
  """(offset, next_offset, key, {ext: bytes} or error str) of each sample
  of a tar, from the member header at byte `offset`.

  next_offset is where the next sample starts (None at the end). A damaged
  tar ends with the sample cut short (if any; next_offset DAMAGED) and one
  item (DAMAGED, None, '@damaged', error string).
  """
  key, start, members, tar = None, offset, {}, None
  with open(path, "rb") as f:
    try:
      tar = tarfile.open(fileobj=f, mode="r:")
      tar.firstmember = None  # Read again from `offset`.
      tar.offset = offset
      f.seek(offset)
      while True:
        info = tar.next()
        tar.members.clear()  # tarfile keeps every header; we never need them.
        if info is None:
          break
        if not info.isfile():
          continue
        member_key, ext = _member_key(info.name)
        if member_key != key and key is not None:
          yield start, info.offset, key, members
          members = {}
        if member_key != key:
          key, start = member_key, info.offset
        members[ext] = tar.extractfile(info).read()
      if key is not None:
        yield start, None, key, members
    except (tarfile.TarError, EOFError, OSError) as e:
      # Whole members read before the damage are in `members` (a sample
      # cut short lacks one and is bad); the damage itself is one more.
      if members:
        yield start, DAMAGED, key, members
      where = offset if tar is None else tar.offset
      yield DAMAGED, None, "@damaged", (
          f"damaged shard (near byte {where}: {type(e).__name__}: {e})")


def read_sample_at(path: str, offset: int):
  """(key, members) of the sample whose first header is at `offset`."""
  for _, _, key, members in iter_tar_samples(path, offset):
    return key, members
  raise ValueError(f"No sample at byte {offset} of {path}.")


def sample_record(shard: str, key: str, members) -> dict:
  """A pipeline record of a sample: image bytes, captions (lines of the
  .txt), label (.cls, if any), id '<shard stem>/<key>'; or a bad record
  (`error` says why)."""
  stem = os.path.splitext(os.path.basename(shard))[0]
  record = {"id": f"{stem}/{key}"}
  if isinstance(members, str):
    return {**record, "image": None, "captions": [], "error": members}
  image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
  try:
    if image_ext is None:
      raise ValueError(f"no image member (.{', .'.join(IMAGE_EXTENSIONS)})")
    if "txt" not in members:
      raise ValueError("no caption (.txt member)")
    try:
      text = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"the caption is not UTF-8 (byte offset "
                       f"{e.start})") from None
    record.update(image=members[image_ext], image_format=image_ext,
                  captions=[c.strip() for c in text.splitlines()
                            if c.strip()])
    if "cls" in members:
      record["label"] = int(members["cls"].decode("ascii").strip())
  except ValueError as e:
    return {**record, "image": None, "captions": [], "error": str(e)}
  return record


def shard_list_digest(shards) -> str:
  """Identifies a shard list (names only) in saved states."""
  text = "\n".join(os.path.basename(s) for s in shards)
  return hashlib.md5(text.encode()).hexdigest()[:12]


def process_shards(num_shards: int, *, seed: int, epoch: int,
                   process_index: int, process_count: int) -> list[int]:
  """Indices of the shards process p reads in `epoch`, in reading order."""
  order = np.random.default_rng([seed, epoch]).permutation(num_shards)
  return [int(i) for i in order[process_index::process_count]]


class WdsReader:
  """Records of this process's shards through a shuffle buffer, with a
  JSON-able `state()` / `restore()` (see the module docstring)."""

  def __init__(self, shards, *, seed: int, process_index: int,
               process_count: int, buffer_size: int,
               num_epochs: int | None = None):
    if len(shards) < process_count:
      raise ValueError(
          f"{len(shards)} tar shards cannot be shared by {process_count} "
          "processes (each reads whole shards): give at least as many "
          "shards as processes, or write ArrayRecord shards "
          "(python -m clip_jax.data.shards write) and use source='shards'.")
    self.shards, self.seed = list(shards), seed
    self.process_index, self.process_count = process_index, process_count
    self.buffer_size, self.num_epochs = max(1, buffer_size), num_epochs
    self._rng = np.random.Generator(np.random.PCG64([seed, process_index]))
    self._epoch, self._cursor, self._offset = 0, 0, 0
    self._buffer = []  # [(shard index, offset, record)]
    self._samples = None  # Generator over the shard being read.
    self._damage = None  # The error of the shard being read, once met.

  def _order(self, epoch):
    return process_shards(len(self.shards), seed=self.seed, epoch=epoch,
                          process_index=self.process_index,
                          process_count=self.process_count)

  def _read_one(self):
    """The next (shard index, offset, record) in reading order, or None
    once every epoch is read."""
    while True:
      if self.num_epochs is not None and self._epoch >= self.num_epochs:
        return None
      order = self._order(self._epoch)
      if self._cursor >= len(order):
        self._epoch, self._cursor, self._offset = self._epoch + 1, 0, 0
        continue
      shard = order[self._cursor]
      if self._offset == DAMAGED:  # Its report is next, then the next shard.
        error, self._damage = self._damage, None
        self.close()
        self._cursor, self._offset = self._cursor + 1, 0
        return shard, DAMAGED, sample_record(self.shards[shard], "@damaged",
                                             error)
      if self._samples is None:
        self._samples = iter_tar_samples(self.shards[shard], self._offset)
      item = next(self._samples, None)
      if item is None:  # The shard is read: the next one.
        self._samples = None
        self._cursor, self._offset = self._cursor + 1, 0
        continue
      offset, next_offset, key, members = item
      if offset == DAMAGED:  # Damaged before its first whole sample.
        self._offset, self._damage = DAMAGED, members
        continue
      if next_offset == DAMAGED:  # The report follows: keep its text.
        self._damage = next(self._samples)[3]
        self._offset = DAMAGED
      elif next_offset is None:
        self._samples.close()
        self._samples = None
        self._cursor, self._offset = self._cursor + 1, 0
      else:
        self._offset = next_offset
      return shard, offset, sample_record(self.shards[shard], key, members)

  def next_record(self) -> dict:
    """Raises StopIteration when the buffer is empty at the end."""
    while len(self._buffer) < self.buffer_size:
      item = self._read_one()
      if item is None:
        break
      self._buffer.append(item)
    if not self._buffer:
      raise StopIteration
    j = int(self._rng.integers(len(self._buffer)))
    item = self._buffer[j]
    self._buffer[j] = self._buffer[-1]
    self._buffer.pop()
    return item[2]

  def state(self) -> dict:
    return {"epoch": self._epoch, "cursor": self._cursor,
            "offset": self._offset,
            "damage": self._damage,
            "buffer": [[s, o] if o != DAMAGED else [s, o, r["error"]]
                       for s, o, r in self._buffer],
            "rng": self._rng.bit_generator.state}

  def restore(self, state: dict) -> None:
    """Moves to a saved position; buffered samples are read again."""
    self.close()
    self._epoch, self._cursor = state["epoch"], state["cursor"]
    self._offset, self._damage = state["offset"], state["damage"]
    self._rng.bit_generator.state = state["rng"]
    self._buffer = []
    for shard, offset, *error in state["buffer"]:
      key, members = (("@damaged", error[0]) if offset == DAMAGED else
                      read_sample_at(self.shards[shard], offset))
      self._buffer.append(
          (shard, offset, sample_record(self.shards[shard], key, members)))

  def close(self) -> None:
    if self._samples is not None:
      self._samples.close()
      self._samples = None


def take(reader: WdsReader, n: int) -> list[dict]:
  """Up to n records (fewer at the end of a finite stream)."""
  records = []
  for _ in itertools.repeat(None, n):
    try:
      records.append(reader.next_record())
    except StopIteration:
      break
  return records
