"""Writing outputs so that nothing is ever half-written, and nothing is replaced unasked.

Every file a command produces is written to a temporary name in the same directory and renamed
into place (atomic on POSIX), so an interrupted run leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator

from bpnet_jax.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds.

  Works for files and directories (an existing directory at `path` is replaced). On an
  exception the temporary is removed and `path` is untouched.
  """
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  _remove(tmp)
  try:
    yield tmp
    if os.path.isdir(tmp) and os.path.isdir(path):
      old = f"{path}.{os.getpid()}.old"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  finally:
    _remove(tmp)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json(path: str, obj, indent: int | None = 1) -> None:
  write_text(path, json.dumps(obj, indent=indent) + "\n")


def check_can_write(paths, overwrite: bool) -> None:
  """FileExistsError for the first path that exists (a non-empty directory, or a file) unless
  `overwrite`."""
  for p in paths:
    if os.path.exists(p) and not (os.path.isdir(p) and not os.listdir(p)) and not overwrite:
      raise FileExistsError(f"{p} already exists (pass --overwrite to replace it)")


def read_json(path: str, what: str = "JSON file", error: type = None):
  """The parsed JSON at `path`; `error` (default DataError) in one line naming the file if it is
  missing, unreadable or not valid JSON. `what` says what the file should be."""
  error = error or DataError
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise error(f"{path}: {what} not found") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f"{path}: not a valid {what} ({e})") from None
