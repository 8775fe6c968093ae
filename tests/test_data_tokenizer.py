"""Tokenizer: ids, EOS/padding policies, truncation, vocab check, CLI."""

import pickle

import numpy as np
import pytest

from clip_jax.data import tokenizer as tokenizer_lib

CORPUS = [
    "red apple", "green apple", "grinning face", "face with tears of joy",
    "thumbs up", "waving hand light skin tone", "waving hand dark skin tone",
    "flag france", "flag japan", "smiling cat with heart eyes",
    "left arrow", "right arrow", "red heart", "blue heart", "green heart",
] * 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "t.model"
  return tokenizer_lib.train(CORPUS, 64, str(path))


def test_special_ids(tok):
  sp = tok.processor
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert tok.vocab_size <= 64


def test_eos_policy_puts_one_eos_after_the_tokens(tok):
  texts = ["red apple", "smiling cat with heart eyes", ""]
  out = tok.encode(texts, 32, "eos")
  assert out.dtype == np.int32 and out.shape == (3, 32)
  for row, text in zip(out, texts):
    ids = tok.processor.encode(text)  # Reference: raw sentencepiece ids.
    expected = ids + [1] + [0] * (32 - len(ids) - 1)
    np.testing.assert_array_equal(row, expected)
    assert list(row).count(1) == 1


def test_last_policy_repeats_eos_to_the_end(tok):
  out = tok.encode(["red apple"], 10, "last")[0]
  ids = tok.processor.encode("red apple")
  np.testing.assert_array_equal(out, ids + [1] * (10 - len(ids)))
  assert out[-1] == 1 and 0 not in out


@pytest.mark.parametrize("policy", ["eos", "last"])
def test_truncation_keeps_the_eos(tok, policy):
  text = "face with tears of joy " * 5
  ids = tok.processor.encode(text)
  assert len(ids) > 6
  out = tok.encode([text], 6, policy)[0]
  np.testing.assert_array_equal(out, ids[:5] + [1])


def test_lowercasing(tok):
  np.testing.assert_array_equal(tok.encode(["RED Apple"], 8),
                                tok.encode(["red apple"], 8))
  cased = tokenizer_lib.Tokenizer(tok.model_proto, lowercase=False)
  assert not np.array_equal(cased.encode(["RED Apple"], 8),
                            tok.encode(["red apple"], 8))


def test_decode_inverts_encode(tok):
  assert tok.decode(tok.encode(["red apple"], 8)[0]) == "red apple"


def test_unknown_policy_is_an_error(tok):
  with pytest.raises(ValueError, match="'first'.*eos_policy"):
    tok.encode(["x"], 4, "first")


def test_check_vocab_names_both_numbers(tok):
  tokenizer_lib.check_vocab(tok, tok.vocab_size)
  with pytest.raises(ValueError, match=rf"{tok.vocab_size} tokens.* 10 rows"):
    tokenizer_lib.check_vocab(tok, 10)


def test_pickles_as_its_model(tok):
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(["blue heart"], 8),
                                tok.encode(["blue heart"], 8))


def test_command_line_training(tmp_path):
  corpus = tmp_path / "captions.txt"
  corpus.write_text("\n".join(CORPUS))
  output = tmp_path / "sub" / "x.model"
  tokenizer_lib.main(["train", "--input", str(corpus), "--vocab_size", "60",
                      "--output", str(output)])
  tok = tokenizer_lib.load(str(output))
  assert tok.vocab_size <= 60
  assert tok.decode(tok.encode(["red heart"], 32)[0]) == "red heart"


def test_training_is_deterministic(tmp_path):
  a = tokenizer_lib.train(CORPUS, 50, str(tmp_path / "a.model"))
  b = tokenizer_lib.train(CORPUS, 50, str(tmp_path / "b.model"))
  assert a.model_proto == b.model_proto


def test_missing_model_says_how_to_train(tmp_path):
  with pytest.raises(FileNotFoundError, match="clip_jax.data.tokenizer train"):
    tokenizer_lib.load(str(tmp_path / "none.model"))


def test_emoji_tokenizer_is_cached(tmp_path):
  first = tokenizer_lib.emoji_tokenizer(256, cache_dir=str(tmp_path))
  files = list(tmp_path.glob("emoji-tokenizer-256-*.model"))
  assert len(files) == 1
  again = tokenizer_lib.emoji_tokenizer(256, cache_dir=str(tmp_path))
  assert again.model_proto == first.model_proto
  assert first.vocab_size <= 256
  # Trained on emoji names: a whole common word is one piece.
  assert len(first.processor.encode("face")) == 1


def test_a_smaller_vocabulary_than_asked_warns_and_says_why(tmp_path):
  with pytest.warns(tokenizer_lib.VocabularyTooSmallWarning) as record:
    tok = tokenizer_lib.train(CORPUS, 8000, str(tmp_path / "big.model"))
  got = tok.processor.get_piece_size()  # sentencepiece's own count.
  assert got < 8000
  message = str(record[0].message)
  assert f"has {got} tokens, not the 8000 asked for" in message
  assert "corpus is too small" in message
  assert f"{len(set(CORPUS))} lines" not in message  # Lines, not distinct.
  assert f"{len(CORPUS)} lines" in message


def test_a_vocabulary_of_the_size_asked_does_not_warn(tmp_path):
  import warnings
  size = tokenizer_lib.train(CORPUS, 8000).vocab_size
  with warnings.catch_warnings():
    warnings.simplefilter("error", tokenizer_lib.VocabularyTooSmallWarning)
    tok = tokenizer_lib.train(CORPUS, size, str(tmp_path / "fit.model"))
  assert tok.vocab_size == size


def test_cli_prints_the_shortfall_as_one_warning_line(tmp_path):
  import subprocess
  import sys
  corpus = tmp_path / "captions.txt"
  corpus.write_text("a cat\na dog\n")
  proc = subprocess.run(
      [sys.executable, "-m", "clip_jax.data.tokenizer", "train", "--input",
       str(corpus), "--vocab_size", "8000", "--output",
       str(tmp_path / "t.model")], capture_output=True, text=True,
      timeout=120, check=True)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: ")
  assert "not the 8000 asked for" in lines[0]


@pytest.mark.parametrize("make", ["text", "folder", "missing"])
def test_a_bad_tokenizer_path_names_it_and_how_to_fix(tmp_path, make):
  path = tmp_path / "tok.model"
  if make == "text":
    path.write_text("not a model\n")
  elif make == "folder":
    path.mkdir()
  with pytest.raises((ValueError, OSError), match="tok.model") as info:
    tokenizer_lib.load(str(path))
  assert "config.data.tokenizer" in str(info.value)


def test_cli_missing_input_is_one_line(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run(
      [sys.executable, "-m", "clip_jax.data.tokenizer", "train", "--input",
       str(tmp_path / "nope.txt"), "--output", str(tmp_path / "t.model")],
      capture_output=True, text=True, timeout=120,
      env={k: v for k, v in __import__("os").environ.items()
           if k != "CLIP_JAX_VERBOSE"})
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      f"error: --input {str(tmp_path / 'nope.txt')!r} not found; give a "
      "text file with one caption a line."]


def test_siglip_style_sentencepiece_model_loads(tmp_path):
  """SigLIP's English tokenizers are T5-style sentencepiece models (pad 0,
  EOS 1, UNK 2, no BOS, unigram, nmt_nfkc, no lower-casing in the model):
  one trained with those settings loads and encodes as sentencepiece
  itself does, plus EOS and padding."""
  import sentencepiece as spm
  path = tmp_path / "siglip_style.model"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS + [c.upper() for c in CORPUS]),
      model_prefix=str(tmp_path / "siglip_style"), vocab_size=60,
      model_type="unigram", normalization_rule_name="nmt_nfkc",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      hard_vocab_limit=False, minloglevel=2, num_threads=1)
  tok = tokenizer_lib.load(str(path), lowercase=False)
  reference = spm.SentencePieceProcessor(model_file=str(path))
  for text in ["Red Apple", "flag japan", ""]:
    ids = reference.encode(text)
    row = tok.encode([text], 16, "eos")[0]
    np.testing.assert_array_equal(row, ids + [1] + [0] * (15 - len(ids)))
    np.testing.assert_array_equal(tok.encode([text], 16, "last")[0],
                                  ids + [1] * (16 - len(ids)))
