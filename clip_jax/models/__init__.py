"""The towers and the two-tower model.

  vit.py         image tower (ViT, class token or MAP head)
  text.py        text tower (transformer, EOS / last / first / mean pooling)
  two_towers.py  build_model(config.model) -> TwoTowers; config keys there
  common.py      shared blocks: pre-LN encoder (remat / scan), dtypes
"""
