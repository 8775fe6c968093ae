"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " " + FAKE_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The files that take minutes, collected first. `make test` runs
# `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each worker takes
# whole files in collection order, so a long file started last would leave
# the other worker idle (without the flag xdist orders files by test count).
_SLOW_FILES_FIRST = ("test_preemption.py", "test_train_exit.py",
                     "test_accum.py", "test_multiprocess.py",
                     "test_train.py", "test_fast_paths.py",
                     "test_train_cli.py", "test_distill.py", "test_losses.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.path))
    return (_SLOW_FILES_FIRST.index(name) if name in _SLOW_FILES_FIRST
            else len(_SLOW_FILES_FIRST))
  items.sort(key=rank)  # Stable: the order within a file is kept.
