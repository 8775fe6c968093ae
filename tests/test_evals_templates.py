"""Template-set names: aliases, case, '-', and one-line errors."""

import pytest

from clip_jax.evals import templates


@pytest.mark.parametrize("name, expected", [
    ("imagenet", "clip_imagenet"), ("ImageNet", "clip_imagenet"),
    ("clip-imagenet", "clip_imagenet"), ("imagenet-7", "clip_imagenet_7"),
    ("clip_imagenet_7", "clip_imagenet_7"), ("emoji", "emoji"),
    ("none", "none"),
])
def test_aliases_resolve(name, expected):
  assert templates.resolve_name(name) == expected
  assert templates.get_templates(name) == templates.TEMPLATES[expected]


def test_every_alias_names_a_registered_set():
  assert set(templates.ALIASES.values()) <= set(templates.TEMPLATES)
  assert not set(templates.ALIASES) & set(templates.TEMPLATES)


def test_unknown_name_lists_the_sets_in_one_line():
  with pytest.raises(ValueError) as info:
    templates.get_templates("imagenett")
  message = str(info.value)
  assert "\n" not in message
  assert "'imagenett'" in message
  assert ", ".join(sorted(templates.TEMPLATES)) in message
