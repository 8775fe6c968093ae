"""Host memory on transparent huge pages: entry points re-exec once with
glibc's `glibc.malloc.hugetlb=1` tunable.

Why: XLA:CPU allocates a program's temporaries afresh at every execution
(the demo's train step: ~290 MiB), and glibc's malloc serves a block that
large with mmap and returns it with munmap. On 4 KiB pages that is ~74,000
page faults per demo step, each zeroing a page: a third of the step's time
(README, "Performance"). With the tunable (glibc >= 2.35) malloc advises
those mappings MADV_HUGEPAGE, so the kernel maps them in 2 MiB pages
(~400 faults per step) when its transparent-huge-page mode is `madvise`
(Debian's and Ubuntu's default) or `always`.

glibc reads tunables once, at process start, so `reexec_if_wanted()` (called
by cli.run / cli.run_plain and the benchmarks, before any work) re-runs the
same command line with the tunable added to GLIBC_TUNABLES; it changes
nothing else. The re-exec keeps the process id, so launchers, signals and
multi-host start-up are unaffected. It is skipped where it cannot help
(not Linux, not glibc >= 2.35, THP `never`, a malloc replacement such as
tcmalloc in LD_PRELOAD, as on TPU VMs) and when CLIP_JAX_HUGEPAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_ENV = "CLIP_JAX_HUGEPAGES"  # "0": keep the default malloc.
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # The release that added glibc.malloc.hugetlb.


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's THP mode ('always' | 'madvise' | 'never'), None if unknown."""
  try:
    with open(path, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_version(libc: tuple[str, str]) -> tuple[int, ...] | None:
  name, version = libc
  if name != "glibc":
    return None
  try:
    return tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None


def has_tunable(environ) -> bool:
  return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def wanted(environ, *, system: str, libc: tuple[str, str],
           thp: str | None) -> bool:
  """Whether a process in `environ` should re-exec with TUNABLE."""
  if environ.get(OPT_OUT_ENV, "1") == "0":
    return False
  if has_tunable(environ):
    return False  # Already set: this is the re-exec'd process, or the user's.
  if "malloc" in environ.get("LD_PRELOAD", ""):
    return False  # tcmalloc / jemalloc replace glibc's malloc.
  version = _glibc_version(libc)
  return (system == "Linux" and version is not None and version >= MIN_GLIBC
          and thp in ("always", "madvise"))


def environment_with_tunable(environ) -> dict[str, str]:
  """A copy of environ with TUNABLE in GLIBC_TUNABLES (appended if absent)."""
  env = dict(environ)
  if has_tunable(env):
    return env
  existing = env.get("GLIBC_TUNABLES")
  env["GLIBC_TUNABLES"] = f"{existing}:{TUNABLE}" if existing else TUNABLE
  return env


def reexec_if_wanted() -> None:
  """Re-run this process's command line with TUNABLE, when it helps.

  Call it first thing in `if __name__ == "__main__":`, before output or
  work: whatever ran before is done again by the new process image.
  """
  if not wanted(os.environ, system=platform.system(),
                libc=platform.libc_ver(), thp=thp_mode()):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
            environment_with_tunable(os.environ))
