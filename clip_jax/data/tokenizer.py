r"""sentencepiece tokenizer: train, load, encode with an explicit EOS policy.

Ids: pad = 0, eos = 1, unk = 2, no BOS (the text tower's defaults
`pad_id=0, eos_id=1`). `encode` returns int32 [B, context_length]:
  policy 'eos'   tokens, one EOS, then pad; truncated to L - 1 tokens so the
                 EOS is always there (for the text tower's `eos` pooling).
  policy 'last'  tokens, then EOS repeated to the end ("sticky EOS"), so the
                 last position is always EOS (for `last` pooling).

  python -m clip_jax.data.tokenizer train --input captions.txt \
      --vocab_size 8000 --output tok.model
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
POLICIES = ("eos", "last")


class Tokenizer:
  """A sentencepiece model with the project's EOS/padding policy."""

  def __init__(self, model_proto: bytes, *, lowercase: bool = True):
    self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self.lowercase = lowercase
    if (self.processor.pad_id(), self.processor.eos_id()) != (PAD_ID, EOS_ID):
      raise ValueError(
          f"Tokenizer has pad_id={self.processor.pad_id()}, eos_id="
          f"{self.processor.eos_id()}; clip_jax expects pad 0 and eos 1. "
          "Train it with `python -m clip_jax.data.tokenizer train`.")

  @property
  def vocab_size(self) -> int:
    return self.processor.vocab_size()

  def encode(self, texts, context_length: int, policy: str = "eos"):
    if policy not in POLICIES:
      raise ValueError(f"EOS policy {policy!r} is not one of {POLICIES}.")
    if self.lowercase:
      texts = [t.lower() for t in texts]
    fill = PAD_ID if policy == "eos" else EOS_ID
    out = np.full((len(texts), context_length), fill, np.int32)
    for row, ids in enumerate(self.processor.encode(list(texts))):
      ids = ids[:context_length - 1] + [EOS_ID]
      out[row, :len(ids)] = ids
    return out


def load(path: str, *, lowercase: bool = True) -> Tokenizer:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Tokenizer model {path!r} not found; train one with `python -m "
        "clip_jax.data.tokenizer train --input captions.txt --output "
        f"{path}`.")
  with open(path, "rb") as f:
    return Tokenizer(f.read(), lowercase=lowercase)


def train(sentences, vocab_size: int, output: str, *,
          lowercase: bool = True) -> Tokenizer:
  """Trains a unigram sentencepiece model on `sentences`; writes `output`."""
  sentences = [s.lower() if lowercase else s for s in sentences if s.strip()]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model,
      vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2, num_threads=2)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, output)  # Never leave a half-written model behind.
  return Tokenizer(model.getvalue(), lowercase=lowercase)


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
  """The text embedding table must have a row for every token id."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
        f"The tokenizer has {tokenizer.vocab_size} tokens but the text "
        f"tower's embedding table has {vocab_size} rows; set "
        f"config.model.text.vocab_size >= {tokenizer.vocab_size}.")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  cmd = sub.add_parser("train", help="train a tokenizer on a caption file")
  cmd.add_argument("--input", required=True, help="text file, one caption a line")
  cmd.add_argument("--vocab_size", type=int, default=8000)
  cmd.add_argument("--output", required=True)
  cmd.add_argument("--no_lowercase", action="store_true")
  args = parser.parse_args(argv)
  with open(args.input) as f:
    tok = train(f.read().splitlines(), args.vocab_size, args.output,
                lowercase=not args.no_lowercase)
  print(f"wrote {args.output} ({tok.vocab_size} tokens)")


if __name__ == "__main__":
  main()
