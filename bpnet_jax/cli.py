"""`bpnet <command> [flags]`: parse flags, make one library call, print the result.

Configs: `--config=FILE[:ARG]` loads `get_config([ARG])` from a Python file and
`--config.a.b=VALUE` overrides a key (`bpnet_jax.config.load_config_file`, the one loader; main.py
is `bpnet train`). Commands that read a saved model (inference, evaluate, prune, export) take the
model's own saved config; `--config`/`--config.*` there may only change inference settings.
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
from bpnet_jax import model as model_lib
from bpnet_jax import prune as prune_lib
from bpnet_jax import train as train_lib
from bpnet_jax.data import convert, dataset_spec, synthetic
from bpnet_jax.errors import Error
from bpnet_jax.export import task as export_task
from bpnet_jax.inference import coco_eval, detections
from bpnet_jax.inference.predictor import EXPORTED_SUFFIXES, Predictor, exported_model_config
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


# ----------------------------------------------------------------------------------------------
# Commands.

def cmd_summary(argv):
  """bpnet summary --config=FILE | --model=DIR [--depth=N]: parameter counts per module."""
  path, overrides, rest = split_config_args(argv)
  p = _Flags(prog="bpnet summary")
  p.add_argument("--model", help="a saved model (workdir, checkpoint or pruned model dir)")
  p.add_argument("--depth", type=int, default=1, help="module path depth of the table")
  a = p.parse(rest)
  if path is None and a.model is None:
    raise UserError("--config=FILE or --model=DIR is required")
  config = (_given_config(None, overrides, a.model) or checkpoint_lib.saved_config(a.model)
            if path is None else config_lib.validate(config_lib.load_config_file(path, overrides)))
  sk = skeleton_from_config(config)
  h, w = config.dataloader.image_config.height, config.dataloader.image_config.width
  variables = model_lib.abstract_variables(model_lib.build_model(config.model, sk), h, w)
  c = model_lib.count_params(variables)
  print(f"{config.model.architecture}, {config.model.stages} stages, skeleton {sk.name} "
        f"({sk.num_joints} joints, {sk.num_limbs} limbs), input {h}x{w}")
  print(f"params: {c['total']:,} total, {c['trainable']:,} trainable, "
        f"{c['non_trainable']:,} non-trainable, {c['convs']} convs")
  print(model_lib.param_table(variables, a.depth))


def cmd_train(argv):
  """bpnet train --workdir=DIR [--config=FILE] [--config.a.b=v]: train, or resume DIR's run."""
  path, overrides, rest = split_config_args(argv)
  p = _Flags(prog="bpnet train")
  p.add_argument("--workdir", required=True)
  p.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() first (one process per host)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  a = p.parse(rest)
  if path is None:
    saved = os.path.join(a.workdir, checkpoint_lib.CONFIG_FILE)
    if not os.path.isfile(saved):
      raise UserError(f"--config=FILE is required ({saved} does not exist, so there is no run "
                      "to resume)")
    config = config_lib.read_json(saved)
    for item in overrides:
      config_lib.apply_override(config, item)
  else:
    config = config_lib.load_config_file(path, overrides)
  config_lib.validate(config)
  if a.multihost:
    jax.distributed.initialize()
  # A run that fails before its first checkpoint leaves no workdir behind (if it made it).
  with _removed_on_failure(a.workdir, keep_if=_has_checkpoints):
    out = train_lib.train(config, a.workdir, progress=not a.no_progress)
  m = out["metrics"]
  print(f"trained to step {out['step']}/{out['last_step']}"
        + (f", loss {m['loss']:.5g}" if m else "") + f"; outputs in {a.workdir}")


def cmd_dataset_convert(argv):
  """bpnet dataset_convert -d SPEC.json -o OUT -m train|test: COCO JSON -> records (+ masks)."""
  p = _Flags(prog="bpnet dataset_convert")
  p.add_argument("-d", "--dataset_spec", required=True, help="dataset spec JSON")
  p.add_argument("-o", "--output_filename", required=True,
                 help="output base name; files are OUT-fold-PPP-of-NNN[-shard-...]")
  p.add_argument("-m", "--mode", default="train", choices=["train", "test"])
  p.add_argument("-p", "--num_partitions", type=int, default=1)
  p.add_argument("-s", "--num_shards", type=int, default=0)
  p.add_argument("--generate_masks", action="store_true",
                 help="write PNG masks of crowd regions and unlabelled people")
  p.add_argument("--check_files", action="store_true",
                 help="drop (and report) images that are missing, do not decode, or lack a mask")
  p.add_argument("--pose_config", default="bpnet_18joints",
                 help="skeleton the joints are converted to (name or JSON path)")
  p.add_argument("--workers", type=int, default=0, help="processes (0: one per core)")
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  a = p.parse(argv)
  if a.num_partitions < 1 or a.num_shards < 0 or a.workers < 0:
    raise UserError("--num_partitions must be >= 1, --num_shards and --workers >= 0")
  existing = glob.glob(glob.escape(a.output_filename) + "-fold-*") + \
      glob.glob(glob.escape(a.output_filename) + ".summary.json")
  if existing and not a.overwrite:
    raise UserError(f"{existing[0]} already exists (pass --overwrite to replace the outputs)")
  if a.generate_masks and not a.overwrite:
    split = dataset_spec.load_spec(a.dataset_spec).split(a.mode)
    if os.path.isdir(split.masks_dir) and os.listdir(split.masks_dir):
      raise UserError(f"mask directory {split.masks_dir} is not empty (pass --overwrite to "
                      "regenerate its masks)")
  s = convert.convert(a.dataset_spec, a.output_filename, a.mode, a.generate_masks, a.check_files,
                      a.num_partitions, a.num_shards, load_skeleton(a.pose_config),
                      a.workers or None)
  print(f"{s['records']} records from {s['images_with_records']} of {s['images']} images "
        f"({s['persons']} persons, {s['main_persons']} main) -> "
        f"{', '.join(s['files'])}; skipped: {s['skipped'] or 'none'}; "
        f"summary: {a.output_filename}.summary.json")


def cmd_make_synthetic(argv):
  """bpnet make_synthetic --out DIR --num_images N --seed S: a synthetic COCO-format dataset."""
  p = _Flags(prog="bpnet make_synthetic")
  p.add_argument("--out", required=True)
  p.add_argument("--num_images", type=int, required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--width", type=int, default=320)
  p.add_argument("--height", type=int, default=240)
  p.add_argument("--test_fraction", type=float, default=0.2,
                 help="share of the images in the test split")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--style", default="default", choices=sorted(synthetic.STYLES),
                 help="'demo': fewer, larger, part-coloured people on plain backgrounds")
  a = p.parse(argv)
  _positive(p, "num_images")
  if a.width < 16 or a.height < 16:
    raise UserError(f"--width/--height {a.width}x{a.height}: expected at least 16x16")
  if not 0 <= a.test_fraction < 1:
    raise UserError(f"--test_fraction must be in [0, 1), got {a.test_fraction}")
  try:
    counts = synthetic.make_synthetic(a.out, a.num_images, a.seed, a.width, a.height,
                                      a.test_fraction, a.overwrite, style=a.style)
  except ValueError as e:
    raise UserError(str(e)) from None
  for split, c in counts.items():
    print(f"{split}: {c['images']} images, {c['labelled_people']} labelled people, "
          f"{c['unlabelled_people']} unlabelled, {c['crowd_regions']} crowd regions")
  print(f"dataset spec: {os.path.join(a.out, 'dataset_spec.json')}")


def cmd_demo(argv):
  """bpnet demo --workdir=DIR: synthetic data -> train -> evaluate -> prune -> export."""
  p = _Flags(prog="bpnet demo")
  p.add_argument("--workdir", required=True)
  a = p.parse(argv)
  demo.run(a.workdir)


def _model_flags(command):
  p = _Flags(prog=f"bpnet {command}")
  p.add_argument("--model", help="a saved model: training workdir (its latest checkpoint), "
                 "checkpoint or pruned model directory; inference/evaluate also take an "
                 "exported .onnx or TensorRT .engine")
  p.add_argument("--workdir", help="same as --model (the original's flag)")
  return p


def _model_path(args):
  path = args.model or args.workdir
  if not path:
    raise UserError("--model=DIR (or --workdir=DIR) is required")
  return path


def _predictor(command, argv, extra):
  """Parses the model, results and `extra(parser)` flags; returns (args, predictor)."""
  path, overrides, rest = split_config_args(argv)
  p = _model_flags(command)
  p.add_argument("--results_dir", required=True)
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--batch_size", type=int, default=1,
                 help="images per network call (consecutive images of one input shape)")
  extra(p)
  a = p.parse(rest)
  _positive(p, "batch_size")
  model_path = _model_path(a)
  return a, Predictor.from_path(model_path, _given_config(path, overrides, model_path))


def cmd_inference(argv):
  """bpnet inference --model=DIR --input_type=image|dir|json --input=P --results_dir=R"""
  def extra(p):
    p.add_argument("--input_type", required=True, choices=["image", "dir", "json"])
    p.add_argument("--input", required=True, help="an image, a folder, or a JSON list")
    p.add_argument("--image_root_path", help="root of relative paths in a JSON input")
    p.add_argument("--dump_visualizations", action="store_true",
                   help="also write R/images_annotated/ with the skeletons drawn")
  a, predictor = _predictor("inference", argv, extra)
  paths = detections.list_inputs(a.input_type, a.input, a.image_root_path)
  if not paths:
    raise UserError(f"--input {a.input}: no images found")
  with _removed_on_failure(a.results_dir):
    r = detections.run(predictor, paths, a.results_dir, a.dump_visualizations, a.overwrite,
                       progress=not a.no_progress, batch_size=a.batch_size)
  c = r["counts"]
  print(f"{c['people']} people in {c['images']} images ({c['skipped']} skipped) -> "
        f"{os.path.join(a.results_dir, 'detection.json')}")


def cmd_evaluate(argv):
  """bpnet evaluate --model=DIR --dataset_spec=S.json --results_dir=R: COCO keypoint AP/AR"""
  def extra(p):
    p.add_argument("--dataset_spec", required=True, help="dataset spec JSON (its test_data)")
  a, predictor = _predictor("evaluate", argv, extra)
  split = dataset_spec.load_spec(a.dataset_spec).split("test")
  if not predictor.skeleton.coco_keypoints:
    raise UserError(f"skeleton {predictor.skeleton.name!r} has no coco_keypoints list; COCO "
                    "evaluation needs one")
  detections.check_outputs(a.results_dir, ("metrics.json", "detections_coco.json",
                                           "results.csv"), a.overwrite)
  with _removed_on_failure(a.results_dir):
    r = coco_eval.evaluate_dataset(predictor, split.annotations, split.images_dir,
                                   a.results_dir, progress=not a.no_progress,
                                   batch_size=a.batch_size)
  m = r["metrics"]
  print(f"AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AR {m['AR']:.4f}  on {r['images']} images "
        f"({len(r['skipped'])} skipped, {r['people']} people) -> "
        f"{os.path.join(a.results_dir, 'metrics.json')}")


def cmd_prune(argv):
  """bpnet prune --model=DIR -o OUT_DIR [-pth 0.1 -n max -eq union -pg 8 -nf 16 -el ...]"""
  path, overrides, rest = split_config_args(argv)
  p = _model_flags("prune")
  p.add_argument("--checkpoint", help="same as --model")
  p.add_argument("-o", "--output_dir", required=True, help="where the pruned model is written")
  p.add_argument("-pth", "--pruning_threshold", type=float, default=0.1)
  p.add_argument("-n", "--normalizer", default="max", choices=["max", "L2"])
  p.add_argument("-eq", "--equalization_criterion", default="union",
                 choices=list(prune_lib.CRITERIA))
  p.add_argument("-pg", "--pruning_granularity", type=int, default=8)
  p.add_argument("-nf", "--min_num_filters", type=int, default=16)
  p.add_argument("-el", "--excluded_layers", nargs="*", default=[],
                 help="conv paths to keep whole (e.g. backbone/block_1a_conv_1)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
  a = p.parse(rest)
  if a.pruning_granularity < 1 or a.min_num_filters < 0:
    raise UserError("-pg must be >= 1 and -nf >= 0")
  if not 0.0 <= a.pruning_threshold <= 1.0:       # also rejects nan
    raise UserError(f"-pth {a.pruning_threshold}: expected a number in [0, 1]")
  model_path = a.checkpoint or _model_path(a)
  report = prune_lib.prune_checkpoint(
      model_path, a.output_dir, threshold=a.pruning_threshold, normalizer=a.normalizer,
      criterion=a.equalization_criterion, granularity=a.pruning_granularity,
      min_filters=a.min_num_filters, excluded=tuple(a.excluded_layers),
      overwrite=a.overwrite, config=_given_config(path, overrides, model_path))
  if report["clamped_by_min_filters"]:
    print(f"warning: threshold {a.pruning_threshold} would leave fewer than "
          f"{a.min_num_filters} filters in {len(report['clamped_by_min_filters'])} layers "
          f"(e.g. {report['clamped_by_min_filters'][0]}); kept {a.min_num_filters} there (-nf)",
          file=sys.stderr)
  b, f = report["params"], report["flops"]
  print(f"params {b['before']:,} -> {b['after']:,} ({b['after'] / b['before']:.1%}), FLOPs at "
        f"{report['input_size'][0]}x{report['input_size'][1]} {f['before'] / 1e9:.3f}G -> "
        f"{f['after'] / 1e9:.3f}G ({f['after'] / f['before']:.1%}) -> "
        f"{os.path.abspath(a.output_dir)} (report: prune_report.json)")


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
  p = _model_flags("export")
  p.add_argument("--checkpoint", help="same as --model")
  p.add_argument("-o", "--output_file", required=True, help="OUT.onnx")
  p.add_argument("--data_type", default="fp32", choices=["fp32", "fp16", "int8"])
  p.add_argument("--input_dims", help="H,W,3 fixed input size (default: dynamic H and W)")
  p.add_argument("--opset", type=int, default=17)
  p.add_argument("--sdk_compatible_model", action="store_true",
                 help="upsample the PAF output x4 (nearest), as the original's DeepStream model")
  p.add_argument("--cal_image_dir", help="int8: calibration images (.jpg/.jpeg/.png)")
  p.add_argument("--cal_data_file", help="int8: calibration tensor (.npy; reused if present)")
  p.add_argument("--cal_cache_file", help="int8: TensorRT calibration cache (reused if present)")
  p.add_argument("--cal_method", default="entropy", choices=["entropy", "percentile", "minmax"])
  p.add_argument("--batches", type=int, default=10, help="int8: calibration batches")
  p.add_argument("--batch_size", type=int, default=1, help="int8: calibration batch size")
  p.add_argument("--engine_file", help="also build a TensorRT engine (needs tensorrt + a GPU)")
  p.add_argument("--max_batch_size", type=int, default=1, help="engine profile: batch 1..N")
  p.add_argument("--max_workspace_size", type=int, default=2 << 30, help="engine, bytes")
  p.add_argument("--saved_model", help="also write a TF SavedModel here (needs TensorFlow)")
  p.add_argument("--overwrite", action="store_true")
  a = p.parse(rest)
  _positive(p, "max_batch_size", "max_workspace_size", "batches", "batch_size", "opset")
  model_path = a.checkpoint or _model_path(a)
  r = export_task.export_model(
      model_path, a.output_file, config=_given_config(path, overrides, model_path),
      data_type=a.data_type, input_dims=_input_dims(a.input_dims), opset=a.opset,
      sdk_compatible=a.sdk_compatible_model, cal_image_dir=a.cal_image_dir,
      cal_data_file=a.cal_data_file, cal_cache_file=a.cal_cache_file, cal_method=a.cal_method,
      batches=a.batches, batch_size=a.batch_size, engine_file=a.engine_file,
      max_batch_size=a.max_batch_size, max_workspace_size=a.max_workspace_size,
      saved_model=a.saved_model, overwrite=a.overwrite)
  if "saved_model" in r:
    print(f"{a.saved_model}: TF SavedModel, max |diff| vs JAX "
          f"{r['saved_model']['max_abs_diff']:.2e}")
  if "engine" in r:
    print(f"{a.engine_file}: TensorRT {r['engine']['tensorrt']} engine, batch "
          f"1..{a.max_batch_size}")
  print(f"{a.output_file}: {a.data_type}, input {r['input']['dims']}, {sum(r['ops'].values())} "
        f"nodes; ONNX Runtime vs JAX max |diff| {r['parity']['max_abs_diff']:.2e} "
        f"(tolerance {r['parity']['tolerance'] or 'none for int8'}); report "
        f"{os.path.splitext(a.output_file)[0] + '.report.json'}")


COMMANDS = {
    "demo": cmd_demo,
    "summary": cmd_summary,
    "train": cmd_train,
    "make_synthetic": cmd_make_synthetic,
    "dataset_convert": cmd_dataset_convert,
    "inference": cmd_inference,
    "evaluate": cmd_evaluate,
    "prune": cmd_prune,
    "export": cmd_export,
}


def main(argv=None, prog: str = "bpnet"):
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: {prog} <command> [flags]\ncommands:")
    for name, fn in COMMANDS.items():
      print(f"  {name:<16} {fn.__doc__.splitlines()[0]}")
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"{prog}: error: unknown command {name!r} (commands: {', '.join(COMMANDS)})",
          file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
  try:
    COMMANDS[name](rest)
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
