"""Trains BodyPoseNet: python main.py --config=configs/coco.py --workdir=DIR [--config.a.b=v].

The same as `bpnet train` (one flag parser and one config loader): `--config=FILE[:ARG]`,
`--config.a.b=VALUE` overrides, `--workdir=DIR`; without --config, resumes the run in DIR.
"""

import sys

from bpnet_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["train", *sys.argv[1:]], prog="main.py"))
