"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
# The tests' programs are tiny: compiling them takes most of the time, and
# with LLVM's optimisations off the CPU backend compiles them ~1.8x faster
# (test_train.py's multi-device tests: 61 s -> 34 s). XLA's own HLO passes
# still run, so the program is the one a run compiles; a float result can
# differ from an -O2 build in the last bit (seen once: a warmup lr, by one
# ulp), which only a comparison with a literal notices. The processes the
# tests start inherit the flag (subprocess_env.py).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE, FAKE_DEVICES]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The files that take minutes, longest first. Under `--dist loadfile
# --no-loadscope-reorder` (Makefile) each file is one unit of work, handed
# to the workers in collection order: the long files start first and the
# short ones fill in around them, instead of a long one starting last and
# running alone. Measured with `make test` (--durations); a file missing
# here only runs later.
LONGEST_FILES_FIRST = (
    "test_multiprocess.py", "test_accum.py", "test_distill.py",
    "test_train_cli.py", "test_losses.py", "test_train.py",
    "test_convert.py", "test_fast_paths.py", "test_slip.py", "test_lora.py",
    "test_train_exit.py", "test_scaling.py", "test_sweep.py",
    "test_resume.py", "test_api.py", "test_remat.py", "test_experiments.py",
)


def pytest_collection_modifyitems(config, items):
  del config  # Unused.
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable.
