"""Evaluators: zero-shot classification, retrieval, linear probe.

  templates.py     prompt template sets (data) and get_templates()
  ranking.py       ranks of the right answers, chunked, deterministic ties
  zeroshot.py      classifier() prompt ensembles, evaluate_zeroshot(),
                   run_zeroshot() (several template sets side by side)
  retrieval.py     recall_at_k(): image<->text, several captions per image
  linear_probe.py  logistic regression (optax L-BFGS), l2 on validation
  embed.py         embedding batches / texts on the mesh, padding + masks
  readers.py       eval batches from sources; class-per-folder images; TFDS
                   classification sets
  run.py           EVALUATORS registry, config.evals keys, run_all(), due()

The math modules take arrays (and an embed_texts callable); only run.py
knows about configs, models and data sources.
"""
