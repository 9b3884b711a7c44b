"""Trains BodyPoseNet: python main.py --config=configs/coco.py --workdir=DIR [--config.a.b=v]."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bpnet_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and the resolved config.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() first (one process per host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  return cli.run_train(_CONFIG.value, _WORKDIR.value, _MULTIHOST.value)


if __name__ == "__main__":
  cli.preflight(sys.argv[1:])   # One-line errors for a bad --config / --config.* override.
  app.run(main)
