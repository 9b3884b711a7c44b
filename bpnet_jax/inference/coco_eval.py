"""COCO keypoint evaluation: people -> COCO results -> pycocotools COCOeval (OKS AP / AR).

As the original: every image of the annotation file is evaluated, joints map to the COCO-17
order by name (the 18-joint skeleton's neck is dropped), category 1, COCOeval 'keypoints' with
its defaults except maxDets = [20]. Unlike the original, coordinates stay float (it truncated
them to integers, costing AP on small people).

Outputs in results_dir: metrics.json {AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl},
detections_coco.json (COCO results format) and results.csv (metric, IoU, area, maxDets, score).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Mapping

import jax
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bpnet_jax import fileio
from bpnet_jax.data.dataset_spec import resolve_inside
from bpnet_jax.errors import DataError
from bpnet_jax.inference import detections
from bpnet_jax.inference.predictor import Predictor
from bpnet_jax.inference.preprocess import read_image
from bpnet_jax.skeleton import Skeleton

METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
_CSV_ROWS = (("AP", "0.50:0.95", "all"), ("AP", "0.50", "all"), ("AP", "0.75", "all"),
             ("AP", "0.50:0.95", "medium"), ("AP", "0.50:0.95", "large"),
             ("AR", "0.50:0.95", "all"), ("AR", "0.50", "all"), ("AR", "0.75", "all"),
             ("AR", "0.50:0.95", "medium"), ("AR", "0.50:0.95", "large"))
MAX_DETS = 20


def coco_results(people_by_image: Mapping[int, list], skeleton: Skeleton,
                 category_id: int = 1) -> list[dict]:
  """COCO keypoint results: one entry per person, 17 (x, y, v) float triplets, v = 1 when the
  joint was found (missing joints are 0, 0, 0)."""
  to_coco = skeleton.to_coco
  out = []
  for image_id, people in people_by_image.items():
    for p in people:
      kp = np.asarray(p["keypoints"], np.float64)
      coco = np.zeros((len(to_coco), 3))
      has = to_coco >= 0
      src = kp[to_coco[has]]
      found = src[:, 2] > 0
      coco[np.flatnonzero(has)[found], :2] = src[found, :2]
      coco[np.flatnonzero(has)[found], 2] = 1
      out.append({"image_id": int(image_id), "category_id": category_id,
                  "keypoints": [round(float(v), 3) for v in coco.ravel()],
                  "score": float(p["score"])})
  return out


def coco_eval(gt, results: list[dict], verbose: bool = True) -> dict:
  """COCOeval keypoints of `results` against `gt` (a pycocotools COCO or a JSON path).

  Returns {metric: value} for METRICS; prints pycocotools' table when verbose.
  """
  if not results:
    if verbose:
      print("no detections: every metric is 0")
    return {m: 0.0 for m in METRICS}
  with contextlib.redirect_stdout(io.StringIO()):      # pycocotools prints progress
    gt = COCO(gt) if isinstance(gt, str) else gt
    ev = COCOeval(gt, gt.loadRes(results), "keypoints")
    ev.params.maxDets = [MAX_DETS]
    ev.evaluate()
    ev.accumulate()
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    ev.summarize()
  if verbose:
    print(buf.getvalue(), end="")
  # -1 means "no ground truth in this area range"; report it as 0 like an empty class.
  return {m: float(max(v, 0.0)) for m, v in zip(METRICS, ev.stats)}


def write_results(results_dir: str, metrics: dict, results: list[dict]) -> None:
  """metrics.json, detections_coco.json and results.csv, each written atomically."""
  put = lambda name, text: fileio.write_text(os.path.join(results_dir, name), text)
  put("detections_coco.json", json.dumps(results))
  put("metrics.json", json.dumps(metrics, indent=1) + "\n")
  rows = ["metric,IoU,area,maxDets,score"]
  for (metric, iou, area), name in zip(_CSV_ROWS, METRICS):
    rows.append(f"{metric},{iou},{area},{MAX_DETS},{metrics[name]:.6f}")
  put("results.csv", "\n".join(rows) + "\n")


def load_coco(path: str) -> COCO:
  """pycocotools' COCO of an annotation file; DataError naming the file if it is missing, not
  JSON, or not COCO-shaped."""
  try:
    with contextlib.redirect_stdout(io.StringIO()):      # pycocotools prints progress
      return COCO(path)
  except FileNotFoundError:
    raise DataError(f"{path}: annotation file not found") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  except (KeyError, TypeError, AssertionError, AttributeError) as e:
    raise DataError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None


def _image_paths(gt: COCO, annotations: str, images_dir: str) -> dict:
  """{image id: path} of every image of `gt`, each checked to stay inside images_dir."""
  return {i: resolve_inside(images_dir, gt.imgs[i]["file_name"],
                            f"{annotations}: image {i}: file_name") for i in sorted(gt.getImgIds())}


def _predict_all(predictor, paths: dict, progress: bool, batch_size: int, workers: int):
  """({image id: people}, [skip reasons]) of `predictor` over `paths` {image id: path}."""
  people_by_image, skipped = {}, []
  bar = detections.progress_bar(len(paths), progress)
  stream = predictor.predict_iter(list(paths), load=lambda i: read_image(paths[i]),
                                  batch_size=batch_size, workers=workers)
  for image_id, people, err in stream:
    bar.update(1)
    if err is not None:
      skipped.append(str(err))
      bar.write(f"warning: skipped {err}")
      continue
    people_by_image[image_id] = people
  bar.close()
  return people_by_image, skipped


def evaluate_dataset(predictor, annotations: str, images_dir: str, results_dir: str,
                     progress: bool = True, verbose: bool = True, batch_size: int = 1,
                     workers: int = 2) -> dict:
  """Runs `predictor` on every image of a COCO keypoint annotation file and evaluates.

  batch_size: images per network call; workers: image loading and decoding threads (each),
  as `Predictor.predict_iter`.
  Unreadable images are skipped and counted (their people count as missed). Returns
  {"metrics", "images", "skipped", "people"}.
  """
  gt = load_coco(annotations)
  paths = _image_paths(gt, annotations, images_dir)
  people_by_image, skipped = _predict_all(predictor, paths, progress, batch_size, workers)
  results = coco_results(people_by_image, predictor.skeleton)
  metrics = coco_eval(gt, results, verbose)
  write_results(results_dir, metrics, results)
  return {"metrics": metrics, "images": len(people_by_image), "skipped": skipped,
          "people": len(results)}


class CocoEvaluator:
  """COCO keypoint AP/AR of model variables held in memory (evaluation during training).

    evaluator = CocoEvaluator(config, skeleton, annotations, images_dir)
    metrics = evaluator({"params": ..., "batch_stats": ...})     # {AP, AP50, ..., ARl}

  The ground truth and image paths are read once and one Predictor is kept, so every call
  after the first reuses the compiled network (its variables are swapped, not re-traced): the
  same post-processing and pycocotools evaluation as `bpnet evaluate`, without a checkpoint
  reload. Variables are copied to one device first, so a state replicated over a training mesh
  evaluates once, not once per device.
  """

  def __init__(self, config, skeleton, annotations: str, images_dir: str, batch_size: int = 1,
               workers: int = 2):
    self.config, self.skeleton = config, skeleton
    self.gt = load_coco(annotations)
    self.paths = _image_paths(self.gt, annotations, images_dir)
    self.batch_size, self.workers = batch_size, workers
    self.predictor = None

  def __call__(self, variables) -> dict:
    variables = jax.device_put(variables, jax.local_devices()[0])
    if self.predictor is None:
      self.predictor = Predictor.from_variables(self.config, variables, self.skeleton,
                                                name="training state")
    else:
      self.predictor.backend.variables = variables
    people_by_image, _ = _predict_all(self.predictor, self.paths, False, self.batch_size,
                                      self.workers)
    return coco_eval(self.gt, coco_results(people_by_image, self.skeleton), verbose=False)
