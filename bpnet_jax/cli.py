"""`bpnet <command> [flags]`: the command-line entry points.

Each command is a function taking parsed flags; user errors (a bad config, a missing file) print
one line `bpnet <command>: error: ...` to stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections


class UserError(Exception):
  """An error caused by the user's input: reported in one line, exit status 2."""


USER_ERRORS = (UserError,)


def _user_errors():
  from bpnet_jax.config import ConfigError
  from bpnet_jax.skeleton import SkeletonError
  return USER_ERRORS + (ConfigError, SkeletonError)


def load_config_file(path: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a Python config file, then applies 'a.b.c=value' overrides.

  The config file's grandparent directory goes on sys.path so variants can `from configs
  import coco` however the command is launched.
  """
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} does not exist")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("_bpnet_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path!r} has no get_config() function")
  config = module.get_config()
  for item in overrides:
    apply_override(config, item)
  return config


def apply_override(config, item: str):
  """Sets 'section.key=value' (value parsed as a Python literal, else kept as a string)."""
  import ast
  if "=" not in item:
    raise UserError(f"override {item!r}: expected key=value")
  key, raw = item.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  node = config
  parts = key.split(".")
  for p in parts[:-1]:
    if p not in node:
      raise UserError(f"override config.{key}: unknown key {p!r}")
    node = node[p]
  if parts[-1] not in node:
    raise UserError(f"override config.{key}: unknown key {parts[-1]!r}")
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise UserError(f"override config.{key}={raw}: {e}") from None


def _split_config_args(argv):
  """--config=PATH and --config.a.b=V from argv; returns (path, overrides, rest)."""
  path, overrides, rest = None, [], []
  it = iter(argv)
  for a in it:
    if a.startswith("--config="):
      path = a.split("=", 1)[1]
    elif a == "--config":
      path = next(it, None)
    elif a.startswith("--config."):
      overrides.append(a[len("--config."):])
    else:
      rest.append(a)
  return path, overrides, rest


def cmd_summary(argv):
  """bpnet summary --config=FILE [--depth=N]: parameter counts and a per-module table."""
  import argparse
  path, overrides, rest = _split_config_args(argv)
  parser = argparse.ArgumentParser(prog="bpnet summary")
  parser.add_argument("--depth", type=int, default=1, help="module path depth of the table")
  args = parser.parse_args(rest)
  if path is None:
    raise UserError("--config=FILE is required")
  import jax
  from bpnet_jax import config as config_lib, model as model_lib, skeleton as skeleton_lib
  config = config_lib.validate(load_config_file(path, overrides))
  sk = skeleton_lib.load_skeleton(config.dataloader.pose_config.pose_config_path)
  net = model_lib.build_model(config.model, sk)
  h, w = config.dataloader.image_config.height, config.dataloader.image_config.width
  variables = jax.eval_shape(lambda: model_lib.init_variables(net, jax.random.key(0), h, w))
  c = model_lib.count_params(variables)
  print(f"{config.model.architecture}, {config.model.stages} stages, skeleton {sk.name} "
        f"({sk.num_joints} joints, {sk.num_limbs} limbs), input {h}x{w}")
  print(f"params: {c['total']:,} total, {c['trainable']:,} trainable, "
        f"{c['non_trainable']:,} non-trainable, {c['convs']} convs")
  print(model_lib.param_table(variables, args.depth))


def preflight(argv, command="train"):
  """Loads --config and its --config.* overrides the way main.py will, so a missing file, an
  unknown key or a bad value exits with one line instead of a config_flags traceback."""
  path, overrides, _ = _split_config_args(argv)
  if path is None:
    return
  try:
    load_config_file(path, overrides)
  except _user_errors() as e:
    print(f"bpnet {command}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except Exception as e:   # An exception inside the user's config file itself.
    print(f"bpnet {command}: error: config file {path!r} failed to load: "
          f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)


def run_train(config, workdir) -> int:
  """Validates `config` and trains into `workdir`; returns the exit status."""
  from bpnet_jax import config as config_lib
  try:
    config_lib.validate(config)
    raise UserError("training is not implemented yet (it lands with the training issue)")
  except _user_errors() as e:
    print(f"bpnet train: error: {e}", file=sys.stderr)
    return 2


def cmd_train(argv):
  """bpnet train --config=FILE --workdir=DIR: same as main.py."""
  path, overrides, rest = _split_config_args(argv)
  if path is None:
    raise UserError("--config=FILE is required")
  status = run_train(load_config_file(path, overrides), None)
  if status:
    sys.exit(status)


COMMANDS = {
    "summary": cmd_summary,
    "train": cmd_train,
}


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print("usage: bpnet <command> [flags]\ncommands:")
    for name, fn in COMMANDS.items():
      print(f"  {name:<16} {fn.__doc__.splitlines()[0]}")
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"bpnet: error: unknown command {name!r} (commands: {', '.join(COMMANDS)})",
          file=sys.stderr)
    return 2
  try:
    COMMANDS[name](rest)
  except _user_errors() as e:
    print(f"bpnet {name}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
