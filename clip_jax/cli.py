"""Entry-point wrapper: a user's mistake is one line, a bug keeps its traceback.

  if __name__ == "__main__":
    cli.run(main)          # instead of absl's app.run(main)

User errors (a bad flag, a typo'd config key, a missing config file, a
config that fails validation, a missing file, an unknown name) print one
line `error: <what is wrong and how to fix it>` on stderr and exit with
status USAGE_ERROR (2): retrying the same command cannot succeed. Anything
else is unexpected: Python's usual traceback, status 1. `--verbose` (or the
environment variable CLIP_JAX_VERBOSE=1) shows the traceback of user errors
too.

What counts as a user error: UserError, absl's UsageError and flag errors,
config_flags' errors while loading --config, and ValueError / OSError /
KeyError raised by clip_jax's own checks (the innermost frame of the
traceback is in clip_jax or configs/; the same error raised inside a
library, e.g. a shape mismatch in JAX, is a bug to report).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

from clip_jax import host_malloc

USAGE_ERROR = 2
VERBOSE_ENV = "CLIP_JAX_VERBOSE"

flags.DEFINE_bool(
    "verbose", False,
    f"Show the Python traceback of user errors too (or set {VERBOSE_ENV}=1).")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_USER_ERROR_TYPES = (ValueError, OSError, KeyError)


class UserError(Exception):
  """A mistake in the user's input; printed as one line."""


def verbose_requested(argv) -> bool:
  """--verbose on the command line (read before flags parse) or the env var."""
  if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
    return True
  return any(a in ("--verbose", "--verbose=true", "--verbose=1")
             for a in argv[1:])


def one_line(message: str) -> str:
  """A message's lines joined into one, whitespace runs collapsed."""
  return " ".join(str(message).split())


def _raised_by_project(error: BaseException) -> bool:
  """True if the innermost traceback frame is clip_jax's or a configs/ file."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return (filename.startswith(_PACKAGE_DIR + os.sep)
          or os.sep + "configs" + os.sep in filename)


def _message(error: BaseException) -> str:
  if len(error.args) == 1 and isinstance(error.args[0], BaseException):
    return _message(error.args[0])  # AttributeError(KeyError(...)).
  if isinstance(error, KeyError) and len(error.args) == 1:
    return str(error.args[0])  # str(KeyError) adds quotes and escapes.
  return str(error) or type(error).__name__


def user_error_message(error: BaseException) -> str | None:
  """The one-line message of a user error raised in main(), else None."""
  if isinstance(error, (UserError, app.UsageError, flags.Error)):
    return one_line(_message(error))
  if isinstance(error, _USER_ERROR_TYPES) and _raised_by_project(error):
    return one_line(_message(error))
  return None


# ------------------------------------------- evals from the command line ----


def zeroshot_folder_eval(spec: str, templates: str | None = None):
  """(name, eval config) of a zero-shot eval on an image folder.

  `spec` is 'PATH' or 'PATH:TEMPLATES' (PATH/<class name>/*.png|jpg;
  TEMPLATES comma-separated set names, aliases resolved, default 'none').
  The eval is named after the folder: 'zeroshot_<folder name>'.
  """
  from clip_jax.evals import templates as templates_lib  # pylint: disable=g-import-not-at-top
  path, _, given = spec.partition(":")
  templates = given or templates or "none"
  names = [templates_lib.resolve_name(t) for t in templates.split(",") if t]
  if not names:
    raise UserError(f"{spec!r} names no template set; valid: "
                    f"{', '.join(sorted(templates_lib.TEMPLATES))}.")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise UserError(
        f"Zero-shot folder {path!r} is not a directory; give a folder ROOT "
        "with ROOT/<class name>/*.png|jpg.")
  label = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path)) or "root"
  return f"zeroshot_{label}", dict(
      type="zeroshot", source="image_folder", path=path, split="test",
      templates=names if len(names) > 1 else names[0])


# ------------------------------------------------ errors at flag parsing ----

_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def _config_flag_args(argv) -> dict[str, str]:
  """{flag name: value} of the `--name X` / `--name=X` config-file flags."""
  names = [n for n, f in flags.FLAGS._flags().items()  # pylint: disable=protected-access
           if type(f.parser).__module__.startswith("ml_collections")
           and "." not in n]
  found = {}
  for i, arg in enumerate(argv[1:], start=1):
    for name in names:
      if arg.startswith(f"--{name}="):
        found[name] = arg.split("=", 1)[1]
      elif arg == f"--{name}" and i + 1 < len(argv):
        found[name] = argv[i + 1]
  return found


def _missing_config_file(argv) -> str | None:
  for name, value in _config_flag_args(argv).items():
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      hint = ""
      folder = os.path.dirname(path) or "."
      if os.path.isdir(folder):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
        if files:
          hint = (" Config files in " + folder + ": "
                  + ", ".join(os.path.join(folder, f) for f in files) + ".")
      return (f"config file {path!r} not found (--{name} {value}); give the "
              f"path of a .py file defining get_config().{hint}")
  return None


def flag_error_message(error: BaseException, argv) -> str | None:
  """The one-line message of an error raised while parsing flags, or None."""
  text = _message(error)
  missing = _missing_config_file(argv)
  if missing and isinstance(error, (OSError, flags.Error)):
    return missing
  match = _DID_YOU_MEAN.search(text)
  if isinstance(error, (KeyError, AttributeError)):
    key = text.splitlines()[0].strip("'\"\\ ")
    given = [a for a in argv[1:] if re.match(rf"--\w+\..*\b{re.escape(key)}\b",
                                             a)]
    where = f" ({given[0]})" if given else ""
    hint = (f"; did you mean {match.group(1)!r}?" if match else ".")
    return (f"unknown config key {key!r}{where}{hint} `python -m "
            "clip_jax.config show CONFIG_FILE` lists every key.")
  if "Error whilst parsing config file" in text:
    # config_flags wraps get_config's ValueError/TypeError with the whole
    # traceback as text; its last line is the error itself.
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    last = re.sub(r"^\w+(Error|Exception): ", "", last.strip())
    return one_line(f"in the config argument: {last}")
  if isinstance(error, flags.Error):
    return one_line(text).rstrip(".") + " (--helpfull lists the flags)."
  if isinstance(error, (ValueError, TypeError, OSError)):
    return one_line(text)
  return None


def _check_config_flags() -> None:
  """Surfaces a config file's deferred load error (config_flags keeps an
  object that raises on first access)."""
  for name, flag in flags.FLAGS._flags().items():  # pylint: disable=protected-access
    if (type(flag.parser).__module__.startswith("ml_collections")
        and "." not in name and flag.value is not None):
      getattr(flag.value, "keys", None)


def _fail(message: str) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(USAGE_ERROR)


def parse_flags(argv):
  """absl flag parsing with one-line errors (app.run's flags_parser)."""
  try:
    rest = flags.FLAGS(argv)
    _check_config_flags()
  except Exception as e:  # pylint: disable=broad-except
    message = flag_error_message(e, argv)
    if message is None or verbose_requested(argv):
      raise
    _fail(message)
  return rest


def guard(main, argv_for_verbose=None):
  """main wrapped so that user errors print one line and exit 2."""
  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      message = user_error_message(e)
      if message is None or verbose_requested(argv_for_verbose or sys.argv):
        raise
      if isinstance(e, app.UsageError):
        message = message.rstrip(".") + " (--help lists the flags)."
      _fail(message)
  return guarded


def run(main, argv=None) -> None:
  """absl's app.run(main) with one-line user errors (module docstring),
  in a process whose large host buffers sit on huge pages (host_malloc)."""
  if argv is None:  # The re-exec repeats the process's own command line.
    host_malloc.reexec_if_wanted()
  argv = sys.argv if argv is None else argv
  app.run(guard(main, argv), argv=argv, flags_parser=parse_flags)


def run_plain(main) -> None:
  """sys.exit(main()) for argparse entry points, with one-line user errors
  (--verbose / CLIP_JAX_VERBOSE=1 for the traceback); huge pages as run()."""
  host_malloc.reexec_if_wanted()
  verbose = verbose_requested(sys.argv)
  if "--verbose" in sys.argv:
    sys.argv.remove("--verbose")
  try:
    code = main()
  except Exception as e:  # pylint: disable=broad-except
    message = user_error_message(e)
    if message is None or verbose:
      raise
    _fail(message)
  sys.exit(code)
