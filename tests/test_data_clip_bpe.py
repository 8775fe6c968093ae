"""CLIP BPE tokenizer: ids equal open_clip's and transformers' tokenizers.

The references are test-only dependencies (open_clip_torch, transformers);
both are built from the same local merges file, nothing is downloaded.
"""

import html
import json
import pickle
import unicodedata

import numpy as np
import pytest

from clip_jax.data import clip_bpe

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

WORDS = ("a photo of the cat dog running on grass near river old man woman "
         "child playing with red blue green ball sunset over mountains "
         "café naïve résumé Zürich façade jalapeño über São Paulo Ærøskøbing "
         "don't it's we're they've I'm you'll he'd CLIP's").split()
SYMBOLS = list("!?.,;:'\"()[]{}<>@#$%^&*-_=+/\\|~`") + ["...", "--", "!!!"]
EMOJI = ["😀", "🐱", "👍🏽", "🇫🇷", "❤️", "👩‍👩‍👧", "🔥", "🍕"]
CJK = ["猫", "一只猫在草地上", "東京タワー", "고양이", "写真"]
OTHER = ["Ελληνικά", "русский текст", "עברית", "العربية", "हिन्दी", "ไทย"]
SPACES = [" ", "  ", "\t", "\n", " \n\t ", "\u00a0", "\u3000"]
NUMBERS = ["0", "42", "3.14159", "1,000,000", "2024-05-01", "-7", "1e10"]


def make_corpus(n: int, seed: int = 0) -> list[str]:
  """n captions mixing words, accents, emoji, CJK, punctuation, numbers,
  whitespace runs, casing; some empty, some far longer than 77 tokens."""
  rng = np.random.default_rng(seed)
  pools = [WORDS, SYMBOLS, EMOJI, CJK, OTHER, SPACES, NUMBERS]
  weights = np.array([8, 2, 1, 1, 1, 2, 1], float)
  corpus = ["", " ", "\n\t  "]
  while len(corpus) < n:
    length = int(rng.choice([1, 3, 8, 20, 150]))  # 150: long captions.
    parts = []
    for _ in range(length):
      pool = pools[rng.choice(len(pools), p=weights / weights.sum())]
      word = str(pool[rng.integers(len(pool))])
      case = rng.integers(4)
      word = (word.upper() if case == 0 else
              word.capitalize() if case == 1 else word)
      parts.append(word)
      parts.append(str(rng.choice(["", " ", " ", " ", "  "])))
    corpus.append("".join(parts))
  return corpus[:n]


CORPUS = make_corpus(1500)


@pytest.fixture(scope="module")
def tok():
  return clip_bpe.ClipBpeTokenizer()  # open_clip's merges file.


@pytest.fixture(scope="module")
def open_clip_ref(tok):
  return open_clip_tokenizer.SimpleTokenizer(bpe_path=tok.merges_path)


def test_vocabulary_and_special_ids(tok, open_clip_ref):
  assert tok.vocab_size == len(tok.tokens) == 49408
  assert tok.token_ids == {
      **{k: v for k, v in open_clip_ref.encoder.items()
         if v < clip_bpe.SOT_ID}, clip_bpe.SOT: 49406, clip_bpe.EOT: 49407}
  assert (open_clip_ref.sot_token_id, open_clip_ref.eot_token_id) == (
      clip_bpe.SOT_ID, clip_bpe.EOT_ID)


def test_corpus_is_varied():
  assert len(CORPUS) >= 1000
  joined = "".join(CORPUS)
  for probe in ("é", "😀", "猫", "1", "!", "  ", "\t", "CAT"):
    assert probe in joined
  assert "" in CORPUS
  assert sum(len(c.split()) > 100 for c in CORPUS) >= 50  # > 77 tokens.


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_open_clip(tok, open_clip_ref, context_length):
  ours = tok.encode(CORPUS, context_length)
  reference = open_clip_ref(CORPUS, context_length=context_length).numpy()
  mismatched = [CORPUS[i] for i in np.flatnonzero((ours != reference).any(1))]
  assert not mismatched, mismatched[:3]
  truncated = (reference[:, -1] != 0).sum()
  assert truncated >= 50  # The long captions were cut, EOT kept.
  assert (reference[:, -1][reference[:, -1] != 0] == clip_bpe.EOT_ID).all()


def _hf_tokenizer(tok, open_clip_ref, tmp_path):
  transformers = pytest.importorskip("transformers")
  # vocab.json / merges.txt from the reference's own vocabulary.
  vocab = tmp_path / "vocab.json"
  vocab.write_text(json.dumps(open_clip_ref.encoder | {
      clip_bpe.SOT: clip_bpe.SOT_ID, clip_bpe.EOT: clip_bpe.EOT_ID}))
  merges = tmp_path / "merges.txt"
  merges.write_text("#version: 0.2\n" + "\n".join(
      " ".join(m) for m in clip_bpe.read_merges(tok.merges_path)) + "\n")
  # A local folder: from_pretrained reads the two files, downloads nothing.
  return transformers.CLIPTokenizer.from_pretrained(str(tmp_path),
                                                    local_files_only=True)


def _hf_cleaning_agrees(text: str) -> bool:
  """transformers' CLIPTokenizer (tokenizers backend) normalises with NFC
  and lower-casing only, not ftfy / HTML unescaping as OpenAI's; on text
  those leave alone the two references must agree."""
  nfc = unicodedata.normalize("NFC", text)
  return clip_bpe.ftfy.fix_text(html.unescape(html.unescape(text))) == nfc


def test_ids_equal_transformers(tok, open_clip_ref, tmp_path):
  hf = _hf_tokenizer(tok, open_clip_ref, tmp_path)
  texts = [t for t in CORPUS if _hf_cleaning_agrees(t)]
  assert len(texts) >= 1000
  rows = hf(texts, max_length=77, truncation=True)["input_ids"]
  reference = np.zeros((len(texts), 77), np.int32)  # open_clip's padding.
  for i, row in enumerate(rows):
    reference[i, :len(row)] = row
  ours = tok.encode(texts, 77)
  mismatched = [texts[i] for i in np.flatnonzero((ours != reference).any(1))]
  assert not mismatched, mismatched[:3]


def test_cleaning_that_transformers_skips_follows_openai(tok, open_clip_ref):
  texts = ["caf&eacute; &amp; bar", "“quoted” ﬁsh", "ＦＵＬＬ width",
           "mojibake cafÃ©"]
  assert not any(_hf_cleaning_agrees(t) for t in texts)
  np.testing.assert_array_equal(tok.encode(texts, 20),
                                open_clip_ref(texts, context_length=20))


def test_eos_pooling_index_is_argmax(tok):
  """OpenAI pools at argmax(tokens); the text tower at the first eos_id:
  the same position, since EOT is the highest id and occurs once."""
  rows = tok.encode(CORPUS[:200], 77)
  first_eot = np.argmax(rows == clip_bpe.EOT_ID, axis=1)
  np.testing.assert_array_equal(np.argmax(rows, axis=1), first_eot)
  assert ((rows == clip_bpe.EOT_ID).sum(1) == 1).all()
  assert (rows[:, 0] == clip_bpe.SOT_ID).all()


def test_last_policy_repeats_eot(tok):
  row = tok.encode(["a photo of a cat"], 12, "last")[0]
  eos = tok.encode(["a photo of a cat"], 12, "eos")[0]
  n = int(np.argmax(eos == clip_bpe.EOT_ID))
  np.testing.assert_array_equal(row[:n], eos[:n])
  assert (row[n:] == clip_bpe.EOT_ID).all()


def test_decode_roundtrip_and_pickle(tok):
  text = "a photo of a Café, 2 dogs & 😀"
  ids = tok.encode([text], 77)[0]
  assert tok.decode(ids) == "a photo of a café , 2 dogs & 😀"
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(CORPUS[:50], 77),
                                tok.encode(CORPUS[:50], 77))
  assert len(pickle.dumps(tok)) < 1000  # A path, not the vocabulary.


def test_merges_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="bpe_path"):
    clip_bpe.ClipBpeTokenizer(str(tmp_path / "missing.txt.gz"))
  bad = tmp_path / "bad.txt"
  bad.write_text("header\na b\nnot-a-pair\n")
  with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
    clip_bpe.ClipBpeTokenizer(str(bad))


def test_plain_text_merges_file(tok, tmp_path):
  import gzip
  with gzip.open(tok.merges_path, "rt", encoding="utf-8") as f:
    (tmp_path / "merges.txt").write_text(f.read(), encoding="utf-8")
  plain = clip_bpe.ClipBpeTokenizer(str(tmp_path / "merges.txt"))
  np.testing.assert_array_equal(plain.encode(CORPUS[:100], 77),
                                tok.encode(CORPUS[:100], 77))


def _clip_bpe_config():
  from clip_jax import config as config_lib
  config = config_lib.load_config_file("configs/clip.py", "tiny")
  config.data.update(source="emoji", tokenizer="clip_bpe", context_length=8)
  config.model.text.update(vocab_size=49408, eos_id=49407, pad_id=-1)
  return config


def test_pipeline_and_config_build_it(tok):
  from clip_jax import config as config_lib
  from clip_jax.data import pipeline
  from clip_jax.evals import run as eval_run
  config = _clip_bpe_config()
  config_lib.validate(config, device_count=8)
  built = pipeline.get_tokenizer(config.data)
  assert isinstance(built, clip_bpe.ClipBpeTokenizer)
  texts = ["a photo of a cat", "two dogs!"]
  np.testing.assert_array_equal(eval_run.tokenize_fn(config.data)(texts),
                                tok.encode(texts, 8))
  config.data.bpe_path = tok.merges_path
  assert pipeline.get_tokenizer(config.data).merges_path == tok.merges_path


@pytest.mark.parametrize("key, value, message", [
    ("model.text.eos_id", 1, "set config.model.text.eos_id=49407"),
    ("model.text.pad_id", 0, "set config.model.text.pad_id=-1"),
    ("model.text.vocab_size", 1000, "vocab_size >= 49408"),
])
def test_config_rejects_a_text_tower_that_misreads_its_ids(key, value,
                                                           message):
  from clip_jax import config as config_lib
  config = _clip_bpe_config()
  section, name = key.rsplit(".", 1)
  config_lib._get(config, section)[name] = value  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config, device_count=8)


def test_a_tower_that_masks_no_pad_key_may_have_any_pad_id():
  # Converted OpenAI / HF towers: mask_pad=False, pad_id from their config.
  from clip_jax import config as config_lib
  config = _clip_bpe_config()
  config.model.text.update(pad_id=0, mask_pad=False)
  config_lib.validate(config, device_count=8)


def test_clip_bpe_needs_lowercase():
  from clip_jax.data import pipeline
  config = _clip_bpe_config()
  config.data.lowercase = False
  with pytest.raises(ValueError, match="always lower-cases"):
    pipeline.get_tokenizer(config.data)
