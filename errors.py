"""One error path for every `retromae` command: bad input is named in one line and exits 2; nothing the user owns is lost.

- `UsageError`: a bad command-line input; `retromae CMD: error: MESSAGE`, exit 2.
- The argparse types (`at_least`, `positive`, `steps`, `seed`) refuse a bad number when the command is read, before
  anything is loaded, naming the flag and the allowed range.
- `loading(what, name)` turns whatever a loader raises deep inside (a truncated safetensors file, a config.json
  that is not JSON, a folder without weights, a Hub id that cannot be reached) into a `UsageError` naming the
  input; a local path that does not exist is said to not exist.
- `Destination`: the rules every command writes by. A destination that exists and holds anything, or that is
  the source, is only replaced with `--overwrite`; a file where a folder is wanted is refused; a destination
  that cannot be written is refused before the work starts.
"""

import argparse
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from .configuration_retromae import setting_problem


class UsageError(ValueError):
    """A bad command-line input; the message says which and what is allowed."""


class DiagnosticsError(UsageError):
    """A bad evaluation input (flags, held-out corpus, metrics file); the message names it and what is allowed."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to carry on. Exit 130."""


def at_least(minimum: float, kind: type = int):
    """An argparse type: a number of `kind` no smaller than `minimum`."""

    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the kind in "invalid int value"
    return parse


def retromae_setting(name: str, kind: type):
    """An argparse type for one of RetroMAE's settings, checked by `RetroMAEConfig`'s own rule for `name`."""

    def parse(text: str):
        value = kind(text)
        problem = setting_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def positive(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


positive.__name__ = "float"


def steps(text: str) -> int:
    """An argparse type for --max-steps: at least 1, or -1 for 'count by epochs'."""
    value = int(text)
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or -1 to train for --epochs), got {text}")
    return value


steps.__name__ = "int"


def seed(text: str) -> int:
    """An argparse type: a seed numpy, torch and Python all take (0 to 2**32 - 1)."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie between 0 and {2**32 - 1}, got {text}")
    return value


seed.__name__ = "int"


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repository id (`name` or `org/name`, huggingface_hub's rules) rather than a path here."""
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_exists(what: str, name: str, error: type[UsageError] = UsageError) -> None:
    """A `what` (e.g. `--model`) that names a local path must exist; a Hub id is left to the loader."""
    if not is_hub_id(name) and not Path(name).expanduser().exists():
        raise error(f"{what} {name}: no such file or folder.")


def read_json_object(flag: str, path: str) -> dict:
    """The JSON object in the file `path` given to `flag`; a missing file or anything else is a `UsageError`."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot be read ({error.strerror}).") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag} {path}: not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise UsageError(f"{flag} {path}: must hold a JSON object, got {type(config).__name__}.")
    return config


@contextmanager
def loading(what: str, name: str):
    """Load `name` (given as `what`): a failure of any loader becomes a `UsageError` naming it and why."""
    check_exists(what, name)
    try:
        yield
    except UsageError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as error:
        raise UsageError(f"{what} {name}: could not be loaded: {reason(error, name)}") from None
    except Exception as error:  # safetensors' SafetensorError, huggingface_hub's HTTP errors: no common base
        if type(error).__module__.split(".")[0] not in ("safetensors", "huggingface_hub", "requests", "httpx"):
            raise
        raise UsageError(f"{what} {name}: could not be loaded: {reason(error, name)}") from None


def reason(error: Exception, name: str) -> str:
    """The first line of a loader's message, with a hint where the name is neither a folder here nor reachable."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if not Path(name).expanduser().exists():
        text = f"no such local file or folder, and as a Hub id: {text}"
    return text


class Destination:
    """Where a command writes (a folder or a file), and the rules it writes by; checked before any work."""

    def __init__(self, what: str, path: str | os.PathLike, overwrite: bool = False, folder: bool = True):
        self.what, self.path, self.overwrite, self.folder = what, Path(path), overwrite, folder

    def check(self, source: str | os.PathLike | None = None) -> Path:
        """Refuse a destination that would lose the user's files or cannot be written; the path."""
        path = self.path
        if source is not None and Path(source).expanduser().exists() and same_or_inside(path, Path(source)):
            raise UsageError(f"{self.what} {path} is the source {source} (or inside it): write somewhere else.")
        if self.folder and path.is_file():
            raise UsageError(f"{self.what} {path} is a file; give a folder.")
        if not self.folder and path.is_dir():
            raise UsageError(f"{self.what} {path} is a folder; give a file name.")
        if holds_anything(path) and not self.overwrite:
            kind = "holds files" if self.folder else "exists"
            raise UsageError(f"{self.what} {path} {kind}: pass --overwrite to replace it, or choose another.")
        check_writable(self.what, path)
        return path


def same_or_inside(path: Path, source: Path) -> bool:
    path, source = path.expanduser().resolve(), source.expanduser().resolve()
    return path == source or source in path.parents


def holds_anything(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def check_writable(what: str, path: Path) -> None:
    """The destination, or the nearest folder above it that exists, can be written to (so the work is not lost at the end)."""
    existing = path.expanduser().absolute()
    if existing.is_file():  # a file replaced with --overwrite: the new one is written in its folder
        existing = existing.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: {existing} is not writable.")
