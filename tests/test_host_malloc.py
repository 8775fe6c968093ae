"""host_malloc: when entry points re-exec with glibc.malloc.hugetlb=1, that
they do it once, and that the tunable gives large buffers huge pages."""

import platform
import subprocess
import sys

import pytest
from subprocess_env import subprocess_env

from clip_jax import host_malloc

LINUX = dict(system="Linux", libc=("glibc", "2.36"), thp="madvise")


@pytest.mark.parametrize("environ, facts, expected", [
    ({}, LINUX, True),
    ({}, {**LINUX, "thp": "always"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, LINUX, True),
    ({host_malloc.OPT_OUT_ENV: "0"}, LINUX, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"},
     LINUX, False),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, LINUX, False),
    ({}, {**LINUX, "thp": "never"}, False),
    ({}, {**LINUX, "thp": None}, False),
    ({}, {**LINUX, "libc": ("glibc", "2.34")}, False),
    ({}, {**LINUX, "libc": ("", "")}, False),  # musl: no tunables.
    ({}, {**LINUX, "system": "Darwin"}, False),
])
def test_wanted(environ, facts, expected):
  assert host_malloc.wanted(environ, **facts) is expected


def test_tunable_is_appended_to_existing_ones():
  env = host_malloc.environment_with_tunable(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  assert env == {"GLIBC_TUNABLES":
                 "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                 "HOME": "/h"}
  assert host_malloc.environment_with_tunable(env) == env  # Not twice.


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_malloc.thp_mode(str(path)) == "madvise"
  assert host_malloc.thp_mode(str(tmp_path / "missing")) is None


# The child prints once before and once after reexec_if_wanted; then it
# fills a fresh 256 MiB block from glibc's malloc (not numpy's: numpy
# advises huge pages itself) and prints the minor page faults it cost.
CHILD = """
import ctypes, os, resource, sys
from clip_jax import host_malloc
print("before", flush=True)
host_malloc.reexec_if_wanted()
print("after", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(256 * 2**20)
ctypes.memset(block, 1, 256 * 2**20)
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
libc.free(block)
"""
BUFFER_PAGES = 256 * 2**20 // 4096  # 65,536 pages of 4 KiB.


def _run_child(env):
  out = subprocess.run([sys.executable, "-c", CHILD, "arg1", "--flag=2"],
                       env=env, capture_output=True, text=True, timeout=120,
                       check=True).stdout.split("\n")
  faults = next(line for line in out if line.startswith("faults"))
  return ([line for line in out if not line.startswith("faults")],
          int(faults.split()[1]))


def test_reexec_runs_the_same_command_once_with_huge_pages():
  if not host_malloc.wanted({}, system=platform.system(),
                            libc=platform.libc_ver(),
                            thp=host_malloc.thp_mode()):
    pytest.skip("no glibc >= 2.35 with transparent huge pages here")
  env = subprocess_env()
  env.pop("GLIBC_TUNABLES", None)
  lines, faults = _run_child(env)
  # 'before' twice: the first process and the re-exec'd one; then the
  # re-exec'd one, with the tunable and the same arguments, goes on.
  assert lines[:3] == [
      "before", "before",
      f"after {host_malloc.TUNABLE} ['arg1', '--flag=2']"]
  # 2 MiB pages: 128 faults for the buffer, not 65,536 (kernels may fall
  # back to small pages for a few ranges).
  assert faults < BUFFER_PAGES // 8, faults

  lines, faults = _run_child({**env, host_malloc.OPT_OUT_ENV: "0"})
  assert lines[:2] == ["before", "after None ['arg1', '--flag=2']"]
  if host_malloc.thp_mode() == "madvise":  # 'always' gives huge pages anyway.
    assert faults > BUFFER_PAGES // 2, faults  # The 4 KiB-page baseline.
