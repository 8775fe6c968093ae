"""`make help` lists every target the Makefile declares, each with a line
of text."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_help_lists_every_phony_target():
  with open(os.path.join(ROOT, "Makefile")) as f:
    phony = re.search(r"^\.PHONY:(.*)$", f.read(), re.M).group(1).split()
  out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, check=True).stdout
  listed = {}
  for line in out.splitlines()[1:]:
    name, _, text = line.strip().partition(" ")
    listed[name] = text.strip()
  assert set(listed) == set(phony)
  assert all(listed.values())
