r"""OpenAI CLIP's byte-level BPE tokenizer (`config.data.tokenizer='clip_bpe'`).

The vocabulary (49,408 tokens) is built from the standard merges file
`bpe_simple_vocab_16e6.txt.gz` (first line a header, then one merge a line):
  ids 0..255      the 256 bytes, each as a printable unicode character
                  (byte_chars), in code-point order of those characters;
  ids 256..511    the same characters + '</w>' (a byte that ends a word);
  ids 512..49405  one token per merge, the first 48,894 merges in order;
  49406, 49407    <|startoftext|>, <|endoftext|>.
The merges file is read from `config.data.bpe_path` or, when that is None,
from an installed open_clip_torch package's data; nothing is downloaded.

Text is cleaned as CLIP does: ftfy.fix_text, HTML entities unescaped (twice),
runs of whitespace collapsed to one space, stripped, lower-cased. It is then
split into words (contractions, runs of letters, single digits, runs of other
non-space characters), each word's UTF-8 bytes merged by BPE.

`encode` rows are [SOT, tokens..., EOT] then padding, int32 [B, L]:
  policy 'eos'   padding with 0 after the EOT, as open_clip does; a caption
                 too long is cut to L tokens whose last is replaced by EOT.
  policy 'last'  EOT repeated to the end instead of padding.
EOT (49407) is the highest id and occurs once in an 'eos' row, so OpenAI's
pooling at `argmax(tokens)` is the text tower's `pool='eos'` with
`eos_id=49407`. Pad id 0 is also a real token ('!'): the text tower masks
keys equal to its `pad_id`, so set `model.text.pad_id=-1` (no key masked;
the causal mask already hides the padding from the EOT), see MODEL_IDS.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os

import ftfy
import numpy as np
import regex

VOCAB_SIZE = 49408
SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The text tower's keys that fit this tokenizer (config.model.text.*).
MODEL_IDS = {"vocab_size": VOCAB_SIZE, "eos_id": EOT_ID, "pad_id": -1}

# Special tokens, contractions, letters, one digit, other non-space runs.
_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}"
    r"|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
_SPACES = regex.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def byte_chars() -> tuple[str, ...]:
  """The printable character standing for each byte 0..255.

  Printable Latin-1 bytes stand for themselves; the others (controls,
  space, soft hyphen) are shifted to 256, 257, ... in byte order.
  """
  printable = (list(range(ord("!"), ord("~") + 1))
               + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, shifted = {}, 0
  for byte in range(256):
    if byte in printable:
      chars[byte] = chr(byte)
    else:
      chars[byte] = chr(256 + shifted)
      shifted += 1
  return tuple(chars[b] for b in range(256))


def default_merges_path() -> str:
  """open_clip_torch's copy of the merges file, if that package is there."""
  spec = importlib.util.find_spec("open_clip")
  path = (os.path.join(os.path.dirname(spec.origin), MERGES_FILE)
          if spec is not None and spec.origin else None)
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(
        f"No CLIP BPE merges file: config.data.bpe_path is None and no "
        f"installed open_clip_torch package holds {MERGES_FILE}. Set "
        f"config.data.bpe_path to a local copy of {MERGES_FILE} (OpenAI's "
        "CLIP repository and open_clip ship it).")
  return path


def read_merges(path: str) -> list[tuple[str, str]]:
  """The first NUM_MERGES merges of a (gzipped or plain) merges file."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"CLIP BPE merges file {path!r} not found (config.data.bpe_path); "
        f"give the path of {MERGES_FILE}, or None to use open_clip_torch's.")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")[1:1 + NUM_MERGES]  # Line 0: a header.
  merges = [tuple(line.split()) for line in lines]
  bad = [i for i, m in enumerate(merges) if len(m) != 2]
  if len(merges) < NUM_MERGES or bad:
    raise ValueError(
        f"{path!r} is not a CLIP BPE merges file: expected {NUM_MERGES} "
        f"lines of two symbols after a header, got {len(merges)} lines"
        f"{f', line {bad[0] + 2} is {lines[bad[0]]!r}' if bad else ''}.")
  return merges


def clean(text: str) -> str:
  """CLIP's text cleaning: ftfy, HTML entities, whitespace, lower case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _SPACES.sub(" ", text).strip().lower()


def merge_word(symbols: tuple[str, ...], ranks: dict) -> tuple[str, ...]:
  """Applies BPE to one word: repeatedly merges every occurrence (left to
  right) of the adjacent pair with the lowest merge rank."""
  while len(symbols) > 1:
    pairs = set(zip(symbols, symbols[1:]))
    best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if best not in ranks:
      break
    merged, i = [], 0
    while i < len(symbols):
      if (i + 1 < len(symbols) and symbols[i] == best[0]
          and symbols[i + 1] == best[1]):
        merged.append(symbols[i] + symbols[i + 1])
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = tuple(merged)
  return symbols


class ClipBpeTokenizer:
  """CLIP's tokenizer with clip_jax's Tokenizer interface (`encode`,
  `tokenize`, `decode`, `vocab_size`). Pickles as its merges path."""

  def __init__(self, merges_path: str | None = None):
    self.merges_path = merges_path or default_merges_path()
    merges = read_merges(self.merges_path)
    # The byte characters in code-point order: printable bytes, then the
    # shifted ones.
    chars = sorted(byte_chars())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m) for m in merges] + [SOT, EOT]
    self.token_ids = {t: i for i, t in enumerate(tokens)}
    self.tokens = tokens
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.byte_of = {c: b for b, c in enumerate(byte_chars())}
    self._cache = {SOT: [SOT_ID], EOT: [EOT_ID]}

  def __getstate__(self):
    return {"merges_path": self.merges_path}

  def __setstate__(self, state):
    self.__init__(state["merges_path"])

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  def _word_ids(self, word: str) -> list[int]:
    ids = self._cache.get(word)
    if ids is None:
      chars = byte_chars()
      symbols = tuple(chars[b] for b in word.encode("utf-8"))
      symbols = symbols[:-1] + (symbols[-1] + "</w>",)
      ids = [self.token_ids[s] for s in merge_word(symbols, self.ranks)]
      if len(self._cache) < 100_000:
        self._cache[word] = ids
    return ids

  def tokenize(self, texts) -> list[list[int]]:
    """Token ids of each text, without SOT/EOT or padding."""
    return [[i for word in _WORDS.findall(clean(text))
             for i in self._word_ids(word)] for text in texts]

  def encode(self, texts, context_length: int, policy: str = "eos"):
    """int32 [len(texts), context_length]; see the module docstring."""
    if policy not in ("eos", "last"):
      raise ValueError(f"EOS policy {policy!r} is not one of ('eos', "
                       "'last'); set config.data.eos_policy.")
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2 (SOT and EOT) for "
                       f"clip_bpe, got {context_length}.")
    fill = PAD_ID if policy == "eos" else EOT_ID
    out = np.full((len(texts), context_length), fill, np.int32)
    for row, ids in enumerate(self.tokenize(texts)):
      ids = [SOT_ID] + ids[:context_length - 2] + [EOT_ID]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    """Token ids (stopping at EOT, skipping SOT) -> cleaned text."""
    words = []
    for i in (int(i) for i in ids):
      if i == EOT_ID:
        break
      if i != SOT_ID:
        words.append(self.tokens[i])
    words = "".join(words).split("</w>")  # '</w>' ends a word.
    return " ".join(
        bytes(self.byte_of[c] for c in word).decode("utf-8", errors="replace")
        for word in words).strip()
