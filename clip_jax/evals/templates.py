"""Prompt template sets for zero-shot classification (data, not code).

Each template has exactly one '{}' where the class name goes.
  clip_imagenet    the 80 templates of CLIP's ImageNet prompt ensemble
                   (Radford et al. 2021, the "Prompt Engineering for
                   ImageNet" notebook of the CLIP repository);
  clip_imagenet_7  the 7-template subset that notebook selected;
  short            a handful of generic photo templates;
  none             the bare class name;
  emoji            for the built-in emoji dataset (renderings, not photos).
User lists are accepted wherever a set name is (`get_templates`). Names
are case-insensitive, '-' reads as '_', and the obvious aliases in ALIASES
('imagenet' = clip_imagenet, ...) are accepted.
"""

CLIP_IMAGENET = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
]

CLIP_IMAGENET_7 = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
    "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
    "a photo of the small {}.",
]

TEMPLATES = {
    "clip_imagenet": CLIP_IMAGENET,
    "clip_imagenet_7": CLIP_IMAGENET_7,
    "short": ["a photo of a {}.", "a bad photo of a {}.",
              "a photo of the large {}.", "a photo of the small {}.",
              "art of the {}.", "a drawing of a {}."],
    "none": ["{}"],
    "emoji": ["{}", "{} emoji", "an emoji of {}", "a drawing of {}",
              "an icon of {}"],
}


# Other names a user may reasonably type for a set.
ALIASES = {
    "imagenet": "clip_imagenet", "clip": "clip_imagenet",
    "openai": "clip_imagenet", "imagenet_80": "clip_imagenet",
    "imagenet_7": "clip_imagenet_7", "imagenet7": "clip_imagenet_7",
    "clip_imagenet7": "clip_imagenet_7", "bare": "none", "name": "none",
    "photo": "short", "emojis": "emoji",
}


def resolve_name(name: str) -> str:
  """The registered set name `name` stands for; ValueError listing them."""
  key = name.strip().lower().replace("-", "_")
  key = ALIASES.get(key, key)
  if key not in TEMPLATES:
    raise ValueError(
        f"Unknown template set {name!r}; valid names: "
        f"{', '.join(sorted(TEMPLATES))} (or give a list of templates, "
        "each with one '{}' for the class name).")
  return key


def get_templates(name_or_list) -> list[str]:
  """A registered set by name (or alias), or a user's list of '{}'
  templates."""
  if isinstance(name_or_list, str):
    return list(TEMPLATES[resolve_name(name_or_list)])
  templates = list(name_or_list)
  if not templates:
    raise ValueError("The template list is empty; give at least one "
                     "template such as '{}' or 'a photo of a {}.'.")
  for t in templates:
    if not isinstance(t, str):
      raise ValueError(f"Template {t!r} is not a string.")
    try:
      ok = t.count("{}") == 1 and t.format("x") == t.replace("{}", "x")
    except (IndexError, KeyError, ValueError):
      ok = False
    if not ok:
      raise ValueError(
          f"Template {t!r} must contain exactly one '{{}}' for the class "
          "name and no other braces, e.g. 'a photo of a {}.'.")
  return templates
