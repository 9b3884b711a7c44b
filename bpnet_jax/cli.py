"""`bpnet <command> [flags]`: parse flags, make one library call, print the result.

Configs: `--config=FILE[:ARG]` loads `get_config([ARG])` from a Python file and
`--config.a.b=VALUE` overrides a key (`bpnet_jax.config.load_config_file`, the one loader;
main.py is `bpnet train`). Commands that read a saved model (inference, evaluate, prune,
export) take the model's own saved config; `--config`/`--config.*` there may only change
inference settings.
`bpnet train --workdir=DIR` without `--config` resumes the run saved in DIR.

User errors (a bad flag, config, file or model; every `bpnet_jax.errors.Error`) print one line
`bpnet <command>: error: ...` to stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import logging
import os
import shutil
import sys

import jax

from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import config as config_lib
from bpnet_jax import demo
from bpnet_jax import import_weights as import_weights_lib
from bpnet_jax import model as model_lib
from bpnet_jax import prune as prune_lib
from bpnet_jax import train as train_lib
from bpnet_jax.data import convert, dataset_spec, synthetic
from bpnet_jax.errors import Error
from bpnet_jax.export import task as export_task
from bpnet_jax.inference import coco_eval, detections
from bpnet_jax.inference.predictor import (
  EXPORTED_SUFFIXES,
  Predictor,
  default_workers,
  exported_model_config,
)
from bpnet_jax.skeleton import load_skeleton, skeleton_from_config


class UserError(Error):
  """A bad command-line flag."""


def _os_error_line(e: OSError) -> str:
  """'PATH: reason' for a failed read or write (permission, full disk, read-only, missing)."""
  where = e.filename if e.filename is not None else ""
  reason = e.strerror or str(e)
  if e.errno == errno.ENOSPC:
    reason += " (free some space, then rerun: finished outputs are kept)"
  return f"{where}: {reason}" if where else reason


@contextlib.contextmanager
def _removed_on_failure(path: str | None, keep_if=lambda path: False):
  """Removes `path` if the block fails and this command created it (unless keep_if(path))."""
  existed = path is None or os.path.lexists(path)
  try:
    yield
  except BaseException:
    if not existed and os.path.isdir(path) and not keep_if(path):
      shutil.rmtree(path, ignore_errors=True)
    raise


def _has_checkpoints(workdir: str) -> bool:
  ckpts = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one-line UserErrors."""

  def error(self, message):
    raise UserError(message)


def split_config_args(argv):
  """--config=PATH[:ARG] and --config.a.b=V from argv; returns (path, overrides, rest)."""
  path, overrides, rest = None, [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config":
      path = next(it, None)
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return path, overrides, rest


def _given_config(path, overrides, saved_from: str | None = None):
  """The config the user gave: a config file with overrides; or, with overrides only, the saved
  model's config with them applied; None when neither."""
  if path is not None:
    return config_lib.validate(config_lib.load_config_file(path, overrides))
  if overrides and saved_from:
    config = (exported_model_config(saved_from) if saved_from.endswith(EXPORTED_SUFFIXES)
              else checkpoint_lib.saved_config(saved_from))
    for item in overrides:
      config_lib.apply_override(config, item)
    return config_lib.validate(config)
  return None


def _positive(parser, *names):
  """Range checks: each named integer flag must be >= 1."""
  args = parser.parsed
  for name in names:
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UserError(f"--{name} {value}: expected an integer >= 1")


class _Flags(_Parser):
  def parse(self, argv):
    self.parsed = self.parse_args(argv)
    return self.parsed


# Public names of the helpers other front ends (bpnet_jax.detectnet_v2.cli) build on.
Flags = _Flags
check_positive = _positive


# ----------------------------------------------------------------------------------------------
# Commands.

def cmd_summary(argv):
  """bpnet summary --config=FILE | --model=DIR [--depth=N]: parameter counts per module."""
  path, overrides, rest = split_config_args(argv)
  parser = _Flags(prog="bpnet summary")
  parser.add_argument("--model", help="a saved model (workdir, checkpoint or pruned model dir)")
  parser.add_argument("--depth", type=int, default=1, help="module path depth of the table")
  args = parser.parse(rest)
  if path is None and args.model is None:
    raise UserError("--config=FILE or --model=DIR is required")
  config = (_given_config(None, overrides, args.model) or checkpoint_lib.saved_config(args.model)
            if path is None else config_lib.validate(config_lib.load_config_file(path, overrides)))
  sk = skeleton_from_config(config)
  h, w = config.dataloader.image_config.height, config.dataloader.image_config.width
  variables = model_lib.abstract_variables(model_lib.build_model(config.model, sk), h, w)
  counts = model_lib.count_params(variables)
  print(f"{config.model.architecture}, {config.model.stages} stages, skeleton {sk.name} "
        f"({sk.num_joints} joints, {sk.num_limbs} limbs), input {h}x{w}")
  print(f"params: {counts['total']:,} total, {counts['trainable']:,} trainable, "
        f"{counts['non_trainable']:,} non-trainable, {counts['convs']} convs")
  print(model_lib.param_table(variables, args.depth))


def cmd_train(argv):
  """bpnet train --workdir=DIR [--config=FILE] [--config.a.b=v]: train, or resume DIR's run."""
  path, overrides, rest = split_config_args(argv)
  parser = _Flags(prog="bpnet train")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() first (one process per host)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse(rest)
  if path is None:
    saved = os.path.join(args.workdir, checkpoint_lib.CONFIG_FILE)
    if not os.path.isfile(saved):
      raise UserError(f"--config=FILE is required ({saved} does not exist, so there is no run "
                      "to resume)")
    config = config_lib.read_json(saved)
    for item in overrides:
      config_lib.apply_override(config, item)
  else:
    config = config_lib.load_config_file(path, overrides)
  config_lib.validate(config)
  if args.multihost:
    jax.distributed.initialize()
  # A run that fails before its first checkpoint leaves no workdir behind (if it made it).
  with _removed_on_failure(args.workdir, keep_if=_has_checkpoints):
    out = train_lib.train(config, args.workdir, progress=not args.no_progress)
  metrics = out["metrics"]
  print(f"trained to step {out['step']}/{out['last_step']}"
        + (f", loss {metrics['loss']:.5g}" if metrics else "") + f"; outputs in {args.workdir}")


def cmd_dataset_convert(argv):
  """bpnet dataset_convert -d SPEC.json -o OUT -m train|test: COCO JSON -> records (+ masks)."""
  parser = _Flags(prog="bpnet dataset_convert")
  parser.add_argument("-d", "--dataset_spec", required=True, help="dataset spec JSON")
  parser.add_argument("-o", "--output_filename", required=True,
                      help="output base name; files are OUT-fold-PPP-of-NNN[-shard-...]")
  parser.add_argument("-m", "--mode", default="train", choices=["train", "test"])
  parser.add_argument("-p", "--num_partitions", type=int, default=1)
  parser.add_argument("-s", "--num_shards", type=int, default=0)
  parser.add_argument("--generate_masks", action="store_true",
                      help="write PNG masks of crowd regions and unlabelled people")
  parser.add_argument("--no_masks", action="store_true",
                      help="convert without masks (crowds and unlabelled people then count as "
                           "background); without it or --generate_masks, every image needs a "
                           "<stem>.png or <stem>.jpg mask in the masks dir")
  parser.add_argument("--check_files", action="store_true",
                      help="drop (and report) images that are missing or do not decode")
  parser.add_argument("--pose_config", default="bpnet_18joints",
                      help="skeleton the joints are converted to (name or JSON path)")
  parser.add_argument("--max_people", type=int,
                      default=config_lib.default_config().dataloader.max_people,
                      help="the training config's dataloader.max_people: people beyond it in a "
                           "record are counted in the summary")
  parser.add_argument("--num_workers", "--workers", type=int, default=os.cpu_count() or 1,
                      help="processes for the per-image work (default: all cores; the output "
                           "is the same for any count)")
  parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  args = parser.parse(argv)
  if args.num_partitions < 1 or args.num_shards < 0 or args.num_workers < 1 \
      or args.max_people < 1:
    raise UserError("--num_partitions, --num_workers and --max_people must be >= 1, "
                    "--num_shards >= 0")
  if args.generate_masks and args.no_masks:
    raise UserError("--generate_masks and --no_masks contradict each other; pass one")
  existing = glob.glob(glob.escape(args.output_filename) + "-fold-*") + \
      glob.glob(glob.escape(args.output_filename) + ".summary.json")
  if existing and not args.overwrite:
    raise UserError(f"{existing[0]} already exists (pass --overwrite to replace the outputs)")
  if args.generate_masks and not args.overwrite:
    split = dataset_spec.load_spec(args.dataset_spec).split(args.mode)
    if os.path.isdir(split.masks_dir) and os.listdir(split.masks_dir):
      raise UserError(f"mask directory {split.masks_dir} is not empty (pass --overwrite to "
                      "regenerate its masks)")
  summary = convert.convert(
      args.dataset_spec, args.output_filename, args.mode, generate_masks=args.generate_masks,
      check_files=args.check_files, num_partitions=args.num_partitions,
      num_shards=args.num_shards, skeleton=load_skeleton(args.pose_config),
      workers=args.num_workers, no_masks=args.no_masks, max_people=args.max_people)
  masks = ("none (--no_masks)" if summary["no_masks"] else
           ", ".join(f"{n} {kind}" for kind, n in summary["mask_sources"].items()))
  over = (f"; {summary['people_over_max_people']} people beyond max_people "
          f"{summary['max_people']} in {summary['records_over_max_people']} records"
          if summary["records_over_max_people"] else "")
  print(f"{summary['records']} records from {summary['images_with_records']} of "
        f"{summary['images']} images ({summary['persons']} persons, {summary['main_persons']} "
        f"main) -> {', '.join(summary['files'])}; masks: {masks}{over}; skipped: "
        f"{summary['skipped'] or 'none'}; summary: {args.output_filename}.summary.json")


def cmd_make_synthetic(argv):
  """bpnet make_synthetic --out DIR --num_images N --seed S: a synthetic COCO-format dataset."""
  parser = _Flags(prog="bpnet make_synthetic")
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_images", type=int, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--width", type=int, default=320)
  parser.add_argument("--height", type=int, default=240)
  parser.add_argument("--test_fraction", type=float, default=0.2,
                      help="share of the images in the test split")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--style", default="default", choices=sorted(synthetic.STYLES),
                      help="'demo': fewer, larger, part-coloured people on plain backgrounds")
  args = parser.parse(argv)
  _positive(parser, "num_images")
  if args.width < 16 or args.height < 16:
    raise UserError(f"--width/--height {args.width}x{args.height}: expected at least 16x16")
  if not 0 <= args.test_fraction < 1:
    raise UserError(f"--test_fraction must be in [0, 1), got {args.test_fraction}")
  try:
    counts = synthetic.make_synthetic(args.out, args.num_images, args.seed, args.width, args.height,
                                      args.test_fraction, args.overwrite, style=args.style)
  except ValueError as e:
    raise UserError(str(e)) from None
  for split, c in counts.items():
    print(f"{split}: {c['images']} images, {c['labelled_people']} labelled people, "
          f"{c['unlabelled_people']} unlabelled, {c['crowd_regions']} crowd regions")
  print(f"dataset spec: {os.path.join(args.out, 'dataset_spec.json')}")


def cmd_import_weights(argv):
  """bpnet import_weights --weights=FILE --output=DIR [--config=FILE]: ImageNet VGG19 -> backbone"""
  path, overrides, rest = split_config_args(argv)
  parser = _Flags(prog="bpnet import_weights")
  parser.add_argument("--weights", required=True,
                      help="VGG19 ImageNet weights: torchvision/timm vgg19 or vgg19_bn "
                           ".safetensors (or .pth, with torch), or Keras "
                           "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 (with h5py)")
  parser.add_argument("--output", required=True,
                      help="model directory to write (for --config.trainer.pretrained_weights)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse(rest)
  # The config of the training run to come (its model and input normalisation); without one,
  # the default config with max-pool downsampling.
  config = None
  if path is not None:
    config = config_lib.load_config_file(path, overrides)
  elif overrides:
    config, _ = import_weights_lib.import_config(None)
    for item in overrides:
      config_lib.apply_override(config, item)
  with _removed_on_failure(args.output):
    report = import_weights_lib.import_vgg19(args.weights, args.output, config,
                                             overwrite=args.overwrite)
  print("\n".join(import_weights_lib.summary_lines(report)))


def cmd_demo(argv):
  """bpnet demo --workdir=DIR: synthetic data -> train -> evaluate -> prune -> export."""
  parser = _Flags(prog="bpnet demo")
  parser.add_argument("--workdir", required=True)
  args = parser.parse(argv)
  demo.run(args.workdir)


def _model_flags(command):
  parser = _Flags(prog=f"bpnet {command}")
  parser.add_argument("--model", help="a saved model: training workdir (its latest checkpoint), "
                      "checkpoint or pruned model directory; inference/evaluate also take an "
                 "exported .onnx or TensorRT .engine")
  parser.add_argument("--workdir", help="same as --model (the original's flag)")
  return parser


def _model_path(args):
  path = args.model or args.workdir
  if not path:
    raise UserError("--model=DIR (or --workdir=DIR) is required")
  return path


def _predictor(command, argv, extra):
  """Parses the model, results and `extra(parser)` flags; returns (args, predictor)."""
  path, overrides, rest = split_config_args(argv)
  parser = _model_flags(command)
  parser.add_argument("--results_dir", required=True)
  parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--batch_size", type=int, default=1,
                      help="images per network call: images are grouped by network-input shape "
                           "and the last partial group of each shape is padded, so the network "
                           "compiles once per shape")
  parser.add_argument("--workers", type=int, default=default_workers(),
                      help="threads that read and resize images, and as many that decode the "
                           "network's maps (default: the number of cores, at most 8)")
  extra(parser)
  args = parser.parse(rest)
  _positive(parser, "batch_size", "workers")
  model_path = _model_path(args)
  return args, Predictor.from_path(model_path, _given_config(path, overrides, model_path))


def cmd_inference(argv):
  """bpnet inference --model=DIR --input_type=image|dir|json --input=P --results_dir=R"""
  def extra(parser):
    parser.add_argument("--input_type", required=True, choices=["image", "dir", "json"])
    parser.add_argument("--input", required=True, help="an image, a folder, or a JSON list")
    parser.add_argument("--image_root_path", help="root of relative paths in a JSON input")
    parser.add_argument("--dump_visualizations", action="store_true",
                        help="also write R/images_annotated/ with the skeletons drawn")
  args, predictor = _predictor("inference", argv, extra)
  paths = detections.list_inputs(args.input_type, args.input, args.image_root_path)
  if not paths:
    raise UserError(f"--input {args.input}: no images found")
  with _removed_on_failure(args.results_dir):
    result = detections.run(predictor, paths, args.results_dir, args.dump_visualizations,
                            args.overwrite, progress=not args.no_progress,
                            batch_size=args.batch_size, workers=args.workers)
  counts = result["counts"]
  print(f"{counts['people']} people in {counts['images']} images ({counts['skipped']} skipped) -> "
        f"{os.path.join(args.results_dir, 'detection.json')}")


def cmd_evaluate(argv):
  """bpnet evaluate --model=DIR --dataset_spec=S.json --results_dir=R: COCO keypoint AP/AR"""
  def extra(parser):
    parser.add_argument("--dataset_spec", required=True, help="dataset spec JSON (its test_data)")
  args, predictor = _predictor("evaluate", argv, extra)
  split = dataset_spec.load_spec(args.dataset_spec).split("test")
  if not predictor.skeleton.coco_keypoints:
    raise UserError(f"skeleton {predictor.skeleton.name!r} has no coco_keypoints list; COCO "
                    "evaluation needs one")
  detections.check_outputs(args.results_dir, ("metrics.json", "detections_coco.json",
                                               "results.csv"), args.overwrite)
  with _removed_on_failure(args.results_dir):
    result = coco_eval.evaluate_dataset(predictor, split.annotations, split.images_dir,
                                        args.results_dir, progress=not args.no_progress,
                                        batch_size=args.batch_size, workers=args.workers)
  metrics = result["metrics"]
  print(f"AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  AR {metrics['AR']:.4f}  on "
        f"{result['images']} images ({len(result['skipped'])} skipped, {result['people']} "
        "people) -> "
        f"{os.path.join(args.results_dir, 'metrics.json')}")


def cmd_prune(argv):
  """bpnet prune --model=DIR -o OUT_DIR [-pth 0.1 -n max -eq union -pg 8 -nf 16 -el ...]"""
  path, overrides, rest = split_config_args(argv)
  parser = _model_flags("prune")
  parser.add_argument("--checkpoint", help="same as --model")
  parser.add_argument("-o", "--output_dir", required=True, help="where the pruned model is written")
  parser.add_argument("-pth", "--pruning_threshold", type=float, default=0.1)
  parser.add_argument("-n", "--normalizer", default="max", choices=["max", "L2"])
  parser.add_argument("-eq", "--equalization_criterion", default="union",
                      choices=list(prune_lib.CRITERIA))
  parser.add_argument("-pg", "--pruning_granularity", type=int, default=8)
  parser.add_argument("-nf", "--min_num_filters", type=int, default=16)
  parser.add_argument("-el", "--excluded_layers", nargs="*", default=[],
                      help="conv paths to keep whole (e.g. backbone/block_1a_conv_1)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
  args = parser.parse(rest)
  if args.pruning_granularity < 1 or args.min_num_filters < 0:
    raise UserError("-pg must be >= 1 and -nf >= 0")
  if not 0.0 <= args.pruning_threshold <= 1.0:       # also rejects nan
    raise UserError(f"-pth {args.pruning_threshold}: expected a number in [0, 1]")
  model_path = args.checkpoint or _model_path(args)
  report = prune_lib.prune_checkpoint(
      model_path, args.output_dir, threshold=args.pruning_threshold, normalizer=args.normalizer,
      criterion=args.equalization_criterion, granularity=args.pruning_granularity,
      min_filters=args.min_num_filters, excluded=tuple(args.excluded_layers),
      overwrite=args.overwrite, config=_given_config(path, overrides, model_path))
  if report["clamped_by_min_filters"]:
    print(f"warning: threshold {args.pruning_threshold} would leave fewer than "
          f"{args.min_num_filters} filters in {len(report['clamped_by_min_filters'])} layers "
          f"(e.g. {report['clamped_by_min_filters'][0]}); kept {args.min_num_filters} there (-nf)",
          file=sys.stderr)
  params, flops = report["params"], report["flops"]
  print(f"params {params['before']:,} -> {params['after']:,} "
        f"({params['after'] / params['before']:.1%}), FLOPs at "
        f"{report['input_size'][0]}x{report['input_size'][1]} {flops['before'] / 1e9:.3f}G -> "
        f"{flops['after'] / 1e9:.3f}G ({flops['after'] / flops['before']:.1%}) -> "
        f"{os.path.abspath(args.output_dir)} (report: prune_report.json)")


def _input_dims(text):
  if not text:
    return None
  try:
    dims = [int(v) for v in text.split(",")]
  except ValueError:
    dims = []
  if len(dims) != 3 or dims[2] != 3:
    raise UserError(f"--input_dims {text}: expected H,W,3")
  return dims[:2]


def cmd_export(argv):
  """bpnet export --model=DIR -o OUT.onnx [--data_type fp32|fp16|int8] [--input_dims H,W,3]"""
  path, overrides, rest = split_config_args(argv)
  parser = _model_flags("export")
  parser.add_argument("--checkpoint", help="same as --model")
  parser.add_argument("-o", "--output_file", required=True, help="OUT.onnx")
  parser.add_argument("--data_type", default="fp32", choices=["fp32", "fp16", "int8"])
  parser.add_argument("--input_dims", help="H,W,3 fixed input size (default: dynamic H and W)")
  parser.add_argument("--opset", type=int, default=17)
  parser.add_argument("--sdk_compatible_model", action="store_true",
                      help="upsample the PAF output x4 (nearest), as the original's "
                           "DeepStream model")
  parser.add_argument("--cal_image_dir", help="int8: calibration images (.jpg/.jpeg/.png)")
  parser.add_argument("--cal_data_file", help="int8: calibration tensor (.npy; reused if present)")
  parser.add_argument("--cal_cache_file",
                      help="int8: TensorRT calibration cache (reused if present)")
  parser.add_argument("--cal_method", default="entropy",
                      choices=["entropy", "percentile", "minmax"])
  parser.add_argument("--batches", type=int, default=10, help="int8: calibration batches")
  parser.add_argument("--batch_size", type=int, default=1, help="int8: calibration batch size")
  parser.add_argument("--engine_file", help="also build a TensorRT engine (needs tensorrt + a GPU)")
  parser.add_argument("--max_batch_size", type=int, default=1, help="engine profile: batch 1..N")
  parser.add_argument("--max_workspace_size", type=int, default=2 << 30, help="engine, bytes")
  parser.add_argument("--saved_model", help="also write a TF SavedModel here (needs TensorFlow)")
  parser.add_argument("--input_uint8", action="store_true",
                      help="input_1 is (B, H, W, 3) uint8 RGB, normalised inside the graph "
                           "(default: normalised float32, the TAO/DeepStream contract)")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse(rest)
  _positive(parser, "max_batch_size", "max_workspace_size", "batches", "batch_size", "opset")
  model_path = args.checkpoint or _model_path(args)
  report = export_task.export_model(
      model_path, args.output_file, config=_given_config(path, overrides, model_path),
      data_type=args.data_type, input_dims=_input_dims(args.input_dims), opset=args.opset,
      sdk_compatible=args.sdk_compatible_model, cal_image_dir=args.cal_image_dir,
      cal_data_file=args.cal_data_file, cal_cache_file=args.cal_cache_file,
      cal_method=args.cal_method,
      batches=args.batches, batch_size=args.batch_size, engine_file=args.engine_file,
      max_batch_size=args.max_batch_size, max_workspace_size=args.max_workspace_size,
      saved_model=args.saved_model, overwrite=args.overwrite, input_uint8=args.input_uint8)
  if "saved_model" in report:
    print(f"{args.saved_model}: TF SavedModel, max |diff| vs JAX "
          f"{report['saved_model']['max_abs_diff']:.2e}")
  if "engine" in report:
    print(f"{args.engine_file}: TensorRT {report['engine']['tensorrt']} engine, batch "
          f"1..{args.max_batch_size}")
  parity = report["parity"]
  print(f"{args.output_file}: {args.data_type}, input {report['input']['dtype']} "
        f"{report['input']['dims']}, "
        f"{sum(report['ops'].values())} nodes; ONNX Runtime vs JAX max |diff| "
        f"{parity['max_abs_diff']:.2e} (tolerance {parity['tolerance'] or 'none for int8'}); "
        "report "
        f"{os.path.splitext(args.output_file)[0] + '.report.json'}")


COMMANDS = {
    "demo": cmd_demo,
    "summary": cmd_summary,
    "train": cmd_train,
    "import_weights": cmd_import_weights,
    "make_synthetic": cmd_make_synthetic,
    "dataset_convert": cmd_dataset_convert,
    "inference": cmd_inference,
    "evaluate": cmd_evaluate,
    "prune": cmd_prune,
    "export": cmd_export,
}


def main(argv=None, prog: str = "bpnet", commands=None):
  """Runs `<command> [flags]`; returns the exit status. `commands` ({name: fn(argv)}, default
  COMMANDS) lets another front end (detectnet_v2) share the dispatch and the error handling."""
  commands = COMMANDS if commands is None else commands
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: {prog} <command> [flags]\ncommands:")
    for name, fn in commands.items():
      print(f"  {name:<16} {fn.__doc__.splitlines()[0]}")
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in commands:
    print(f"{prog}: error: unknown command {name!r} (commands: {', '.join(commands)})",
          file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
  try:
    commands[name](rest)
  except (Error, FileExistsError) as e:
    print(f"{prog} {name}: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:           # unreadable inputs, read-only outputs, a full disk
    print(f"{prog} {name}: error: {_os_error_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog} {name}: interrupted (finished outputs and checkpoints are kept; rerun to "
          "resume)", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
