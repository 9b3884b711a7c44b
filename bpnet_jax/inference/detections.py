"""`bpnet inference`: images (one, a folder, or a JSON list) -> detection.json (+ drawings).

detection.json (written atomically) holds:
  format      "bpnet_jax.detection/1"
  model       the model path; skeleton: the pose config (joint names, limbs); inference: the
              config.inference settings used
  images      [{"file", "width", "height", "people": [{"score", "keypoints": {joint name:
              [x, y, score]}}], "visualization"?}]: original-image float pixels, [0, 0, 0] for
              a joint not found; person score = 1 - 1/total as the original
  skipped     [{"file", "error"}]: inputs that could not be read (counted, not fatal)
  counts      {"images", "skipped", "people"}
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import tqdm

from bpnet_jax import fileio
from bpnet_jax.errors import InferenceError
from bpnet_jax.inference.predictor import Predictor, people_to_json
from bpnet_jax.inference.preprocess import IMAGE_EXTENSIONS, read_image
from bpnet_jax.inference.visualize import draw_people

FORMAT = "bpnet_jax.detection/1"


def list_inputs(input_type: str, path: str, image_root: str | None = None) -> list[str]:
  """Image paths from --input_type image|dir|json.

  dir: the folder's .jpg/.jpeg/.png files, sorted. json: a list of paths, or an object with an
  "images" list whose entries are paths or have "full_image_path" or "file_name" (a COCO
  annotation file works); relative paths are taken from `image_root`, else the JSON's folder.
  """
  if input_type == "image":
    return [path]
  if input_type == "dir":
    if not os.path.isdir(path):
      raise InferenceError(f"--input {path}: not a directory")
    return sorted(os.path.join(path, f) for f in os.listdir(path)
                  if f.lower().endswith(IMAGE_EXTENSIONS))
  if input_type == "json":
    data = fileio.read_json(path, "JSON list of images", InferenceError)
    entries = data.get("images") if isinstance(data, dict) else data
    if not isinstance(entries, list):
      raise InferenceError(f"--input {path}: expected a list of image paths or an object with "
                           "an 'images' list")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    out = []
    for i, e in enumerate(entries):
      if isinstance(e, dict):
        e = e.get("full_image_path") or e.get("file_name")
      if not isinstance(e, str) or not e:
        raise InferenceError(f"--input {path}: images[{i}] is not a path, nor an object with "
                             "'full_image_path' or 'file_name'")
      out.append(e if os.path.isabs(e) else os.path.join(root, e))
    return out
  raise InferenceError(f"--input_type {input_type!r}: expected image, dir or json")


def check_outputs(results_dir: str, names: Sequence[str], overwrite: bool) -> None:
  """FileExistsError if any output exists and may not be replaced."""
  fileio.check_can_write([os.path.join(results_dir, n) for n in names], overwrite)


def run(predictor: Predictor, paths: Sequence[str], results_dir: str,
        dump_visualizations: bool = False, overwrite: bool = False,
        progress: bool = True, batch_size: int = 1, workers: int = 2) -> dict:
  """Runs the predictor over `paths`; writes results_dir/detection.json (and drawings).

  batch_size: images per network call; workers: image loading and decoding threads (each),
  as `Predictor.predict_iter`. Returns the detection.json content.
  """
  outputs = ["detection.json"] + (["images_annotated"] if dump_visualizations else [])
  check_outputs(results_dir, outputs, overwrite)
  os.makedirs(results_dir, exist_ok=True)
  viz_dir = os.path.join(results_dir, "images_annotated")
  if dump_visualizations:
    os.makedirs(viz_dir, exist_ok=True)
  images, skipped, used_names = [], [], set()
  loaded = {}           # by position (a path may be listed twice), until its people are out

  def load(index):
    loaded[index] = read_image(paths[index])
    return loaded[index]

  bar = progress_bar(len(paths), progress)
  for index, people, err in predictor.predict_iter(range(len(paths)), load=load,
                                                   batch_size=batch_size, workers=workers):
    bar.update(1)
    path = paths[index]
    if err is not None:
      skipped.append({"file": path, "error": str(err)})
      bar.write(f"warning: skipped {err}")
      continue
    image = loaded.pop(index)
    entry = {"file": path, "width": int(image.shape[1]), "height": int(image.shape[0]),
             "people": people_to_json(people, predictor.skeleton)}
    if dump_visualizations:
      stem = os.path.splitext(os.path.basename(path))[0]
      name = stem if stem not in used_names else f"{stem}_{len(images)}"
      used_names.add(name)
      drawn = draw_people(image, people, predictor.skeleton)
      out = os.path.join(viz_dir, name + ".png")
      ok, buf = cv2.imencode(".png", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
      fileio.write_bytes(out, buf.tobytes())
      entry["visualization"] = os.path.join("images_annotated", name + ".png")
    images.append(entry)
  bar.close()
  if not images and skipped:
    raise InferenceError(f"none of the {len(paths)} inputs could be read (e.g. "
                         f"{skipped[0]['error']})")
  result = {
      "format": FORMAT, "model": predictor.name, "skeleton": predictor.skeleton.to_json(),
      "inference": predictor.config.inference.to_dict(), "images": images, "skipped": skipped,
      "counts": {"images": len(images), "skipped": len(skipped),
                 "people": sum(len(e["people"]) for e in images)},
  }
  fileio.write_json(os.path.join(results_dir, "detection.json"), result)
  return result


def progress_bar(total: int, enabled: bool):
  """A tqdm bar over images (a silent one when not enabled)."""
  return tqdm.tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True)
