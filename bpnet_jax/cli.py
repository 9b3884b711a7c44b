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
  from bpnet_jax.data.dataset_spec import SpecError
  from bpnet_jax.export.onnx_model import ExportError
  from bpnet_jax.inference.predictor import InferenceError
  from bpnet_jax.prune import PruneError
  from bpnet_jax.skeleton import SkeletonError
  return USER_ERRORS + (ConfigError, SkeletonError, SpecError, InferenceError, PruneError,
                        ExportError, FileExistsError, FileNotFoundError)


class _Parser(__import__("argparse").ArgumentParser):
  """argparse whose errors are one-line UserErrors."""

  def error(self, message):
    raise UserError(message)


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
  path, overrides, rest = _split_config_args(argv)
  parser = _Parser(prog="bpnet summary")
  parser.add_argument("--depth", type=int, default=1, help="module path depth of the table")
  args = parser.parse_args(rest)
  if path is None:
    raise UserError("--config=FILE is required")
  from bpnet_jax import config as config_lib, model as model_lib, skeleton as skeleton_lib
  config = config_lib.validate(load_config_file(path, overrides))
  sk = skeleton_lib.load_skeleton(config.dataloader.pose_config.pose_config_path)
  net = model_lib.build_model(config.model, sk)
  h, w = config.dataloader.image_config.height, config.dataloader.image_config.width
  variables = model_lib.abstract_variables(net, h, w)
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


def run_train(config, workdir, multihost: bool = False) -> int:
  """Validates `config` and trains into `workdir`; returns the exit status."""
  import logging
  from bpnet_jax import config as config_lib, train as train_lib
  logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
  if not workdir:
    print("bpnet train: error: --workdir is required", file=sys.stderr)
    return 2
  try:
    if multihost:
      import jax
      jax.distributed.initialize()
    config_lib.validate(config)
    out = train_lib.train(config, workdir)
  except _user_errors() + (train_lib.TrainingError,) as e:
    print(f"bpnet train: error: {e}", file=sys.stderr)
    return 2
  m = out["metrics"]
  print(f"trained to step {out['step']}/{out['last_step']}"
        + (f", loss {m['loss']:.5g}" if m else "") + f"; outputs in {workdir}")
  return 0


def cmd_train(argv):
  """bpnet train --config=FILE --workdir=DIR [--config.a.b=v]: same as main.py."""
  path, overrides, rest = _split_config_args(argv)
  p = _Parser(prog="bpnet train")
  p.add_argument("--workdir", required=True)
  p.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() first (one process per host)")
  a = p.parse_args(rest)
  if path is None:
    raise UserError("--config=FILE is required")
  status = run_train(load_config_file(path, overrides), a.workdir, a.multihost)
  if status:
    sys.exit(status)


def cmd_dataset_convert(argv):
  """bpnet dataset_convert -d SPEC.json -o OUT -m train|test: COCO JSON -> records (+ masks)."""
  p = _Parser(prog="bpnet dataset_convert")
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
  a = p.parse_args(argv)
  if a.num_partitions < 1 or a.num_shards < 0:
    raise UserError("--num_partitions must be >= 1 and --num_shards >= 0")
  import glob
  import logging
  from bpnet_jax import skeleton as skeleton_lib
  from bpnet_jax.data import convert
  from bpnet_jax.data import dataset_spec
  logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
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
                      a.num_partitions, a.num_shards,
                      skeleton_lib.load_skeleton(a.pose_config), a.workers or None)
  print(f"{s['records']} records from {s['images_with_records']} of {s['images']} images "
        f"({s['persons']} persons, {s['main_persons']} main) -> "
        f"{', '.join(s['files'])}; skipped: {s['skipped'] or 'none'}; "
        f"summary: {a.output_filename}.summary.json")


def cmd_make_synthetic(argv):
  """bpnet make_synthetic --out DIR --num_images N --seed S: a synthetic COCO-format dataset."""
  p = _Parser(prog="bpnet make_synthetic")
  p.add_argument("--out", required=True)
  p.add_argument("--num_images", type=int, required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--width", type=int, default=320)
  p.add_argument("--height", type=int, default=240)
  p.add_argument("--test_fraction", type=float, default=0.2,
                 help="share of the images in the test split")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--style", default="default", choices=("default", "demo"),
                 help="'demo': fewer, larger, part-coloured people on plain backgrounds")
  a = p.parse_args(argv)
  if not 0 <= a.test_fraction < 1:
    raise UserError(f"--test_fraction must be in [0, 1), got {a.test_fraction}")
  from bpnet_jax.data import synthetic
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
  """bpnet demo --workdir=DIR: synthetic data -> records -> a short training, in one folder."""
  p = _Parser(prog="bpnet demo")
  p.add_argument("--workdir", required=True)
  a = p.parse_args(argv)
  import logging
  from bpnet_jax import demo, train as train_lib
  logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
  try:
    demo.run(a.workdir)
  except train_lib.TrainingError as e:
    raise UserError(str(e)) from None


def _predictor(command, argv, extra):
  """Parses --config, --workdir, --model and `extra(parser)` flags; returns (args, predictor)."""
  path, overrides, rest = _split_config_args(argv)
  p = _Parser(prog=f"bpnet {command}")
  p.add_argument("--workdir", required=True, help="training workdir (its latest checkpoint is "
                 "the model unless --model is given)")
  p.add_argument("--model", help="checkpoint directory, exported .onnx, or TensorRT .engine")
  p.add_argument("--results_dir", required=True)
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--batch_size", type=int, default=1,
                 help="images per network call (consecutive images of one input shape)")
  extra(p)
  a = p.parse_args(rest)
  if path is None:
    raise UserError("--config=FILE is required")
  if a.batch_size < 1:
    raise UserError(f"--batch_size {a.batch_size}: expected an integer >= 1")
  import logging
  from bpnet_jax import config as config_lib
  from bpnet_jax.inference import predictor
  logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
  config = config_lib.validate(load_config_file(path, overrides))
  return a, predictor.Predictor.from_path(config, a.model or a.workdir)


def cmd_inference(argv):
  """bpnet inference --config=F --workdir=D --input_type=image|dir|json --input=P --results_dir=R"""
  def extra(p):
    p.add_argument("--input_type", required=True, choices=["image", "dir", "json"])
    p.add_argument("--input", required=True, help="an image, a folder, or a JSON list")
    p.add_argument("--image_root_path", help="root of relative paths in a JSON input")
    p.add_argument("--dump_visualizations", action="store_true",
                   help="also write R/images_annotated/ with the skeletons drawn")
  from bpnet_jax.inference import detections
  a, predictor = _predictor("inference", argv, extra)
  paths = detections.list_inputs(a.input_type, a.input, a.image_root_path)
  if not paths:
    raise UserError(f"--input {a.input}: no images found")
  r = detections.run(predictor, paths, a.results_dir, a.dump_visualizations, a.overwrite,
                    progress=not a.no_progress, batch_size=a.batch_size)
  c = r["counts"]
  print(f"{c['people']} people in {c['images']} images ({c['skipped']} skipped) -> "
        f"{os.path.join(a.results_dir, 'detection.json')}")


def cmd_evaluate(argv):
  """bpnet evaluate --config=F --workdir=D --dataset_spec=S.json --results_dir=R: COCO AP/AR"""
  def extra(p):
    p.add_argument("--dataset_spec", required=True, help="dataset spec JSON (its test_data)")
  from bpnet_jax.data import dataset_spec
  from bpnet_jax.inference import coco_eval
  from bpnet_jax.inference import detections
  a, predictor = _predictor("evaluate", argv, extra)
  split = dataset_spec.load_spec(a.dataset_spec).split("test")
  if not predictor.skeleton.coco_keypoints:
    raise UserError(f"skeleton {predictor.skeleton.name!r} has no coco_keypoints list; COCO "
                    "evaluation needs one")
  detections.check_outputs(a.results_dir, ("metrics.json", "detections_coco.json",
                                          "results.csv"), a.overwrite)
  r = coco_eval.evaluate_dataset(predictor, split.annotations, split.images_dir, a.results_dir,
                                progress=not a.no_progress, batch_size=a.batch_size)
  m = r["metrics"]
  print(f"AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AR {m['AR']:.4f}  on {r['images']} images "
        f"({len(r['skipped'])} skipped, {r['people']} people) -> "
        f"{os.path.join(a.results_dir, 'metrics.json')}")


def cmd_prune(argv):
  """bpnet prune --config=F --workdir=D -o OUT_DIR [-pth 0.1 -n max -eq union -pg 8 -nf 16 -el ..]"""
  path, overrides, rest = _split_config_args(argv)
  p = _Parser(prog="bpnet prune")
  p.add_argument("--workdir", required=True, help="training workdir (its latest checkpoint)")
  p.add_argument("--checkpoint", help="a checkpoint (workdir, checkpoints/ or step dir) instead")
  p.add_argument("-o", "--output_dir", required=True, help="where the pruned model is written")
  p.add_argument("-pth", "--pruning_threshold", type=float, default=0.1)
  p.add_argument("-n", "--normalizer", default="max", choices=["max", "L2"])
  p.add_argument("-eq", "--equalization_criterion", default="union",
                 choices=["union", "intersection", "arithmetic_mean", "geometric_mean"])
  p.add_argument("-pg", "--pruning_granularity", type=int, default=8)
  p.add_argument("-nf", "--min_num_filters", type=int, default=16)
  p.add_argument("-el", "--excluded_layers", nargs="*", default=[],
                 help="conv paths to keep whole (e.g. backbone/block_1a_conv_1)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
  a = p.parse_args(rest)
  if path is None:
    raise UserError("--config=FILE is required")
  if a.pruning_granularity < 1 or a.min_num_filters < 0:
    raise UserError("-pg must be >= 1 and -nf >= 0")
  out = os.path.abspath(a.output_dir)
  if os.path.exists(out) and os.listdir(out) and not a.overwrite:
    raise UserError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
  from bpnet_jax import config as config_lib, prune as prune_lib
  config = config_lib.validate(load_config_file(path, overrides))
  try:
    report = prune_lib.prune_checkpoint(
        config, a.checkpoint or a.workdir, out, threshold=a.pruning_threshold,
        normalizer=a.normalizer, criterion=a.equalization_criterion,
        granularity=a.pruning_granularity, min_filters=a.min_num_filters,
        excluded=tuple(a.excluded_layers), overwrite=a.overwrite)
  except prune_lib.PruneError as e:
    raise UserError(str(e)) from None
  if report["clamped_by_min_filters"]:
    print(f"warning: threshold {a.pruning_threshold} would leave fewer than "
          f"{a.min_num_filters} filters in {len(report['clamped_by_min_filters'])} layers "
          f"(e.g. {report['clamped_by_min_filters'][0]}); kept {a.min_num_filters} there (-nf)",
          file=sys.stderr)
  b, f = report["params"], report["flops"]
  print(f"params {b['before']:,} -> {b['after']:,} ({b['after'] / b['before']:.1%}), FLOPs at "
        f"{report['input_size'][0]}x{report['input_size'][1]} {f['before'] / 1e9:.3f}G -> "
        f"{f['after'] / 1e9:.3f}G ({f['after'] / f['before']:.1%}) -> {out} "
        f"(report: prune_report.json)")


def cmd_export(argv):
  """bpnet export --config=F --workdir=D -o OUT.onnx [--data_type fp32|fp16] [--input_dims H,W,C]"""
  path, overrides, rest = _split_config_args(argv)
  p = _Parser(prog="bpnet export")
  p.add_argument("--workdir", required=True, help="training workdir (its latest checkpoint)")
  p.add_argument("--checkpoint", help="a checkpoint or pruned model directory instead")
  p.add_argument("-o", "--output_file", required=True, help="OUT.onnx")
  p.add_argument("--data_type", default="fp32", choices=["fp32", "fp16", "int8"])
  p.add_argument("--input_dims", help="H,W,C fixed input size (default: dynamic H and W)")
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
  a = p.parse_args(rest)
  if path is None:
    raise UserError("--config=FILE is required")
  if a.max_batch_size < 1 or a.max_workspace_size < 1:
    raise UserError("--max_batch_size and --max_workspace_size must be >= 1")
  if a.batches < 1 or a.batch_size < 1:
    raise UserError("--batches and --batch_size must be >= 1")
  if not a.output_file.endswith(".onnx"):
    raise UserError(f"-o {a.output_file}: expected a path ending in .onnx")
  dims = None
  if a.input_dims:
    try:
      dims = [int(v) for v in a.input_dims.split(",")]
    except ValueError:
      dims = []
    if len(dims) != 3 or dims[2] != 3:
      raise UserError(f"--input_dims {a.input_dims}: expected H,W,3")
    dims = dims[:2]
  from bpnet_jax import config as config_lib
  from bpnet_jax.export import onnx_model
  from bpnet_jax.inference import predictor
  from bpnet_jax.skeleton import load_skeleton
  config = config_lib.validate(load_config_file(path, overrides))
  config, variables = predictor.load_model(config, a.checkpoint or a.workdir)
  photos = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tests", "data", "coco_mini", "train2017")
  images = [predictor.read_image(os.path.join(photos, f)) for f in sorted(os.listdir(photos))[:2]
            ] if os.path.isdir(photos) else []
  calibration = None
  if a.data_type == "int8":
    if dims is None:
      dims = list(config.inference.input_shape)
    have = [x for x in (a.cal_cache_file, a.cal_data_file) if x and os.path.exists(x)]
    if not a.cal_image_dir and not have:
      raise UserError("--data_type int8 needs --cal_image_dir (or an existing --cal_data_file "
                      "or --cal_cache_file)")
    calibration = onnx_model.int8_calibration(config, a.cal_image_dir, dims, a.batches, a.batch_size,
                                          a.cal_method, a.cal_data_file, a.cal_cache_file)
  try:
    r = onnx_model.export(config, variables, a.output_file, input_dims=dims, data_type=a.data_type,
                      opset=a.opset, sdk_compatible=a.sdk_compatible_model, check_images=images,
                      overwrite=a.overwrite, calibration=calibration)
  except onnx_model.ExportError as e:
    raise UserError(str(e)) from None
  if a.saved_model:
    from bpnet_jax import model as model_lib
    net = model_lib.build_model(config.model,
                                load_skeleton(config.dataloader.pose_config.pose_config_path))
    sm = onnx_model.export_saved_model(net, variables, a.saved_model, dims,
                                   config.inference.output_stage_to_use,
                                   onnx_model.check_inputs(dims), a.overwrite)
    print(f"{a.saved_model}: TF SavedModel, max |diff| vs JAX {sm['max_abs_diff']:.2e}")
  if a.engine_file:
    if dims is None:
      raise UserError("--engine_file needs --input_dims H,W,3 (engines have a fixed input size)")
    e = onnx_model.build_engine(a.output_file, a.engine_file, a.data_type, dims, a.max_batch_size,
                            a.max_workspace_size, a.overwrite)
    print(f"{a.engine_file}: TensorRT {e['tensorrt']} engine, batch 1..{a.max_batch_size}")
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
