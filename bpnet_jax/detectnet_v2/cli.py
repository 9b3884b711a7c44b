"""`detectnet_v2 <command> [flags]`: parse flags, make one library call, print the result.

The DetectNet_v2 counterpart of `bpnet` (`tao detectnet_v2 <task>` in the original). Commands:

  dataset_convert -d SPEC -o OUT_PREFIX [-f FOLD] [--overwrite]
      KITTI labels or COCO JSON -> records (`detectnet_v2.convert`); SPEC is the original's
      DatasetExportConfig as JSON or protobuf text.
  make_synthetic --out DIR --num_images N [--seed S] [--width W --height H] [--val_fraction F]
      a procedural KITTI-format dataset and its conversion spec (`detectnet_v2.synthetic`).
  summary --config=FILE[:ARG] [--config.a.b=V] [--depth N]
      parameter counts and a per-layer table of the config's model.

train, evaluate, inference, prune, export and calibration_tensorfile are not available yet:
they exit with a one-line error.

Configs load with `bpnet_jax.config.load_config_file` (the one loader) against the DetectNet_v2
schema (`detectnet_v2.config`). Dispatch and error handling are `bpnet_jax.cli.main`'s: every
`bpnet_jax.errors.Error` prints one line `detectnet_v2 <command>: error: ...` and exits with
status 2, an OSError prints its path and reason (status 2), Ctrl-C exits with status 130.
"""

from __future__ import annotations

import os
import sys

from bpnet_jax import cli as bpnet_cli
from bpnet_jax import config as config_lib
from bpnet_jax import model as model_lib
from bpnet_jax.detectnet_v2 import config as det_config
from bpnet_jax.detectnet_v2 import convert, synthetic
from bpnet_jax.detectnet_v2 import model as det_model

PROG = "detectnet_v2"
UserError = bpnet_cli.UserError


def cmd_dataset_convert(argv):
  """detectnet_v2 dataset_convert -d SPEC -o OUT_PREFIX [-f FOLD]: KITTI/COCO -> records."""
  parser = bpnet_cli.Flags(prog=f"{PROG} dataset_convert")
  parser.add_argument("-d", "--dataset_export_spec", required=True,
                      help="conversion spec (DatasetExportConfig), JSON or protobuf text")
  parser.add_argument("-o", "--output_filename", required=True,
                      help="output prefix; files are OUT-fold-PPP-of-NNN[-shard-SSSSS-of-TTTTT], "
                           "OUT.summary.json and OUT_warning.json (skipped boxes)")
  parser.add_argument("-f", "--validation_fold", type=int,
                      help="the fold the sample modifier leaves untouched (the validation fold)")
  parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  args = parser.parse(argv)
  if args.validation_fold is not None and args.validation_fold < 0:
    raise UserError(f"-f/--validation_fold {args.validation_fold}: expected an integer >= 0")
  summary = convert.convert(args.dataset_export_spec, args.output_filename,
                            overwrite=args.overwrite, validation_fold=args.validation_fold)
  folds = ", ".join(f"fold {f['fold']}: {f['frames']}" for f in summary["folds"])
  warning = (f" (listed in {os.path.join(os.path.dirname(args.output_filename), w)})"
             if (w := summary.get("warning_file")) else "")
  print(f"{summary['frames']} frames ({folds}), objects {summary['objects_per_class']}, "
        f"target classes {summary['class_names']}; skipped {summary['skipped']}{warning} -> "
        f"{len(summary['files'])} record files; summary: {args.output_filename}.summary.json")


def cmd_make_synthetic(argv):
  """detectnet_v2 make_synthetic --out DIR --num_images N: a synthetic KITTI-format dataset."""
  parser = bpnet_cli.Flags(prog=f"{PROG} make_synthetic")
  parser.add_argument("--out", required=True, help="dataset folder (must not exist)")
  parser.add_argument("--num_images", type=int, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--width", type=int, default=480, help="image width, pixels (>= 32)")
  parser.add_argument("--height", type=int, default=272, help="image height, pixels (>= 32)")
  parser.add_argument("--val_fraction", type=float, default=0.2,
                      help="share of the images in the spec's validation fold (fold 0)")
  parser.add_argument("--image_format", default="png", choices=["png", "jpg"])
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse(argv)
  bpnet_cli.check_positive(parser, "num_images")
  if args.width < 32 or args.height < 32:
    raise UserError(f"--width/--height {args.width}x{args.height}: expected at least 32x32")
  if not 0 <= args.val_fraction < 1:      # also rejects nan
    raise UserError(f"--val_fraction {args.val_fraction}: expected a number in [0, 1)")
  try:
    counts = synthetic.make_synthetic(args.out, args.num_images, args.seed, args.width,
                                      args.height, args.val_fraction, args.overwrite,
                                      image_format=args.image_format)
  except ValueError as e:
    raise UserError(str(e)) from None
  print(f"{counts['images']} images ({counts['val_images']} validation, "
        f"{counts['train_images']} training), objects {counts['objects']}, "
        f"{counts['dontcare_regions']} don't-care regions, {counts['truncated']} truncated, "
        f"{counts['occluded']} occluded")
  print(f"conversion spec: {counts['spec']} (detectnet_v2 dataset_convert -d SPEC -o PREFIX)")


def cmd_summary(argv):
  """detectnet_v2 summary --config=FILE [--depth=N]: parameter counts per layer."""
  path, overrides, rest = bpnet_cli.split_config_args(argv)
  parser = bpnet_cli.Flags(prog=f"{PROG} summary")
  parser.add_argument("--depth", type=int, default=1, help="module path depth of the table")
  args = parser.parse(rest)
  bpnet_cli.check_positive(parser, "depth")
  if path is None:
    raise UserError("--config=FILE is required")
  config = det_config.validate(
      config_lib.load_config_file(path, overrides, free_form=det_config.FREE_FORM))
  names = det_config.class_names(config)
  h, w = det_config.input_shape(config)
  mc = config.model_config
  model = det_model.build_model(mc.to_dict(), len(names), config.training_config.compute_dtype)
  variables = model_lib.abstract_variables(model, h, w)
  counts = model_lib.count_params(variables)
  features = [k for k in ("all_projections", "use_batch_norm", "use_pooling") if mc[k]]
  oh, ow = det_config.output_shape(config)
  print(f"DetectNet_v2 {model.arch}{model.num_layers} ({', '.join(features) or 'plain'}), "
        f"{len(names)} classes {names}, input {h}x{w} -> output grid {oh}x{ow}")
  print(f"params: {counts['total']:,} total, {counts['trainable']:,} trainable, "
        f"{counts['non_trainable']:,} non-trainable, {counts['convs']} convs")
  print(model_lib.param_table(variables, args.depth))


def _not_available(name):
  def cmd(argv):
    raise UserError(f"not available yet (available: {', '.join(AVAILABLE)})")
  cmd.__doc__ = f"{PROG} {name}: not available yet"
  return cmd


AVAILABLE = ("dataset_convert", "make_synthetic", "summary")
COMMANDS = {
    "dataset_convert": cmd_dataset_convert,
    "make_synthetic": cmd_make_synthetic,
    "summary": cmd_summary,
    **{name: _not_available(name) for name in ("train", "evaluate", "inference", "prune",
                                               "export", "calibration_tensorfile")},
}


def main(argv=None) -> int:
  """Runs `detectnet_v2 <command> [flags]`; returns the exit status."""
  return bpnet_cli.main(argv, prog=PROG, commands=COMMANDS)


if __name__ == "__main__":
  sys.exit(main())
