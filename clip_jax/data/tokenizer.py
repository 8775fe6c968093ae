r"""sentencepiece tokenizer: train, load, encode with an explicit EOS policy.

Ids: pad = 0, eos = 1, unk = 2, no BOS (the text tower's `pad_id=0,
eos_id=1`). `encode` returns int32 [B, context_length]:
  policy 'eos'   tokens, one EOS, then pad; truncated to L - 1 tokens so the
                 EOS is always there (for the text tower's `eos` pooling,
                 which reads the first EOS).
  policy 'last'  tokens, then EOS repeated to the end ("sticky EOS"), so the
                 last position is always EOS (for `last` pooling).
Lower-casing (on by default) applies to training and encoding alike.

  python -m clip_jax.data.tokenizer train --input captions.txt \
      --vocab_size 8000 --output tok.model

Training is deterministic (one thread), so every host that trains the same
tokenizer from the same captions gets the same file.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import warnings

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
POLICIES = ("eos", "last")


class Tokenizer:
  """A sentencepiece model with the project's EOS/padding policy.

  Pickles as its model bytes (cheap to send to worker processes).
  """

  def __init__(self, model_proto: bytes, *, lowercase: bool = True):
    self.model_proto, self.lowercase = model_proto, lowercase
    self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
    ids = (self.processor.pad_id(), self.processor.eos_id(),
           self.processor.unk_id(), self.processor.bos_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID, -1):
      raise ValueError(
          f"The tokenizer has pad/eos/unk/bos ids {ids}; clip_jax expects "
          f"({PAD_ID}, {EOS_ID}, {UNK_ID}, -1). Train one with `python -m "
          "clip_jax.data.tokenizer train`.")

  def __getstate__(self):
    return {"model_proto": self.model_proto, "lowercase": self.lowercase}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], lowercase=state["lowercase"])

  @property
  def vocab_size(self) -> int:
    return self.processor.vocab_size()

  def tokenize(self, texts) -> list[list[int]]:
    """Token ids of each text, without EOS or padding."""
    texts = [t.lower() if self.lowercase else t for t in texts]
    if len(texts) < 64:
      # sentencepiece encodes a list with a thread pool: ~40x slower than
      # encoding strings one by one for the pipeline's single captions.
      return [self.processor.encode(t) for t in texts]
    return self.processor.encode(texts)

  def encode(self, texts, context_length: int, policy: str = "eos"):
    """int32 [len(texts), context_length]; see the module docstring."""
    if policy not in POLICIES:
      raise ValueError(f"EOS policy {policy!r} is not one of {POLICIES}; "
                       "set config.data.eos_policy.")
    if context_length < 1:
      raise ValueError(f"context_length must be >= 1, got {context_length}.")
    fill = PAD_ID if policy == "eos" else EOS_ID
    out = np.full((len(texts), context_length), fill, np.int32)
    for row, ids in enumerate(self.tokenize(texts)):
      ids = ids[:context_length - 1] + [EOS_ID]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    """Token ids (EOS / padding stop it) -> text."""
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self.processor.decode([i for i in ids if i != PAD_ID])


def load(path: str, *, lowercase: bool = True) -> Tokenizer:
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Tokenizer model {path!r} not found (config.data.tokenizer); train "
        "one with `python -m clip_jax.data.tokenizer train --input "
        f"captions.txt --vocab_size N --output {path}`.")
  if os.path.isdir(path):
    raise IsADirectoryError(
        f"Tokenizer model {path!r} is a directory (config.data.tokenizer); "
        "give the .model file sentencepiece wrote.")
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return Tokenizer(proto, lowercase=lowercase)
  except RuntimeError as e:  # sentencepiece's own parse error.
    raise ValueError(
        f"Tokenizer model {path!r} is not a sentencepiece model "
        f"(config.data.tokenizer; sentencepiece: {str(e).strip()[:80]}); "
        "give a .model file from `python -m clip_jax.data.tokenizer "
        "train`.") from None


def train(sentences, vocab_size: int, output: str | None = None, *,
          lowercase: bool = True) -> Tokenizer:
  """Trains a unigram sentencepiece model on `sentences`; writes `output`.

  The vocabulary may come out smaller than `vocab_size` when the corpus is
  small (never larger); a VocabularyTooSmallWarning then says so.
  """
  sentences = [s.lower() if lowercase else s for s in sentences if s.strip()]
  if not sentences:
    raise ValueError("Cannot train a tokenizer on no text.")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model,
      vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2, num_threads=1)
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(model.getvalue())
    os.replace(tmp, output)  # Never leave a half-written model behind.
  tokenizer = Tokenizer(model.getvalue(), lowercase=lowercase)
  if tokenizer.vocab_size < vocab_size:
    warnings.warn(vocab_shortfall_message(sentences, vocab_size,
                                          tokenizer.vocab_size),
                  VocabularyTooSmallWarning, stacklevel=2)
  return tokenizer


class VocabularyTooSmallWarning(UserWarning):
  """The trained vocabulary is smaller than the vocab_size asked for."""


def vocab_shortfall_message(sentences, asked: int, got: int) -> str:
  words = {w for s in sentences for w in s.split()}
  chars = {c for s in sentences for c in s if not c.isspace()}
  return (
      f"The tokenizer has {got} tokens, not the {asked} asked for: the "
      f"corpus is too small for more ({len(sentences)} lines, {len(words)} "
      f"distinct words, {len(chars)} distinct characters; sentencepiece "
      "keeps only pieces that occur in it). It works as it is; train on more "
      f"text for a larger vocabulary, or ask for vocab_size <= {got}.")


def emoji_tokenizer(vocab_size: int, *, cache_dir: str | None = None,
                    lowercase: bool = True) -> Tokenizer:
  """A tokenizer trained on the emoji `train` split's captions, cached.

  Held-out names are not in its corpus. The cache file's name includes a
  hash of the corpus, so a new emoji package version trains a new one.
  """
  from clip_jax.data import sources  # pylint: disable=g-import-not-at-top
  rows, _ = sources._emoji_splits()  # pylint: disable=protected-access
  captions = [c for entry, _ in rows["train"] for c in entry.captions]
  digest = hashlib.md5("\n".join(captions).encode("utf-8")).hexdigest()[:8]
  case = "lower" if lowercase else "cased"
  path = os.path.join(sources.cache_root(cache_dir),
                      f"emoji-tokenizer-{vocab_size}-{case}-{digest}.model")
  if os.path.exists(path):
    return load(path, lowercase=lowercase)
  return train(captions, vocab_size, path, lowercase=lowercase)


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
  """The text embedding table must have a row for every token id."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
        f"The tokenizer has {tokenizer.vocab_size} tokens but the text "
        f"tower's embedding table has {vocab_size} rows; set "
        f"config.model.text.vocab_size >= {tokenizer.vocab_size} or use a "
        "smaller tokenizer.")


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.data.tokenizer",
      description="Train a sentencepiece tokenizer for clip_jax.")
  sub = parser.add_subparsers(dest="command", required=True)
  cmd = sub.add_parser("train", help="train a tokenizer on a caption file")
  cmd.add_argument("--input", required=True,
                   help="text file, one caption a line")
  cmd.add_argument("--vocab_size", type=int, default=8000)
  cmd.add_argument("--output", required=True, help="the .model file")
  cmd.add_argument("--no_lowercase", action="store_true")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.input):
    raise FileNotFoundError(f"--input {args.input!r} not found; give a text "
                            "file with one caption a line.")
  with open(args.input, encoding="utf-8") as f:
    lines = f.read().splitlines()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", VocabularyTooSmallWarning)
    tok = train(lines, args.vocab_size, args.output,
                lowercase=not args.no_lowercase)
  print(f"wrote {args.output} ({tok.vocab_size} tokens)")
  for warning in caught:
    print(f"warning: {warning.message}", file=sys.stderr)


if __name__ == "__main__":
  from clip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_plain(main)
