"""Eval reader time per host: every row decoded vs only a host's rows.

  PYTHONPATH=. .venv/bin/python experiments/eval_reader_cost.py

A host of k decodes 1/k of each batch (evals.run.run_all passes
sharding.host_rows); every host still reads all records (paths, labels,
captions). Prints the median ratio of 5 runs, 256 JPEGs 320x256 -> 224.
"""

import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from clip_jax.data import transforms
from clip_jax.evals import readers

SIZE, BATCH = 224, 64


def main():
  root = tempfile.mkdtemp()
  try:
    rng = np.random.default_rng(0)
    for c in range(4):
      os.makedirs(f"{root}/c{c}")
      for i in range(64):
        pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(f"{root}/c{c}/{i}.jpg", quality=90)
    source = readers.ClassFolderSource(root)

    def preprocess(image):
      return transforms.normalize(transforms.preprocess_image(image, SIZE))

    def seconds(rows):
      start = time.perf_counter()
      for _ in readers.record_batches(source, preprocess, BATCH, rows=rows,
                                      image_shape=(SIZE, SIZE, 3)):
        pass
      return time.perf_counter() - start

    for hosts in (2, 8):
      ratios = []
      for _ in range(5):
        every_row = seconds(None)
        # Host 0 of `hosts`: 1/hosts of every batch's rows.
        ratios.append(seconds(np.arange(0, BATCH, hosts)) / every_row)
      print(f"{hosts} hosts: reader time per host, own rows / all rows: "
            f"median {np.median(ratios):.3f} (ideal {1 / hosts:.3f}); all "
            f"rows {every_row:.2f} s for {len(source)} images")
  finally:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
