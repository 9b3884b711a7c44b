"""DetectNet_v2 evaluation: per-class average precision (AP) and mAP over a set of images.

`evaluate(detections_by_image, ground_truth_by_image, config, class_names)`:
  detections_by_image: per image a list of `postprocess.decode` dicts, {"class_name" or
    "class_id", "box": (x1, y1, x2, y2), "confidence"}; boxes in network-input pixels.
  ground_truth_by_image: per image a list of {"class_name" or "class_id", "box": (x1, y1, x2,
    y2), optional "dontcare": bool}, same pixel space (no clipping). Entries whose class is not
    a target class, or with "dontcare" true, are skipped (the original drops unmapped classes,
    including KITTI's dontcare, before evaluation).
  Both are sequences of equal length (image i pairs with image i), or both mappings keyed by an
  image id (the ground truth's keys are the images; a detection key without ground truth is an
  error; an image without a detection entry has no detections). Every image is counted once:
  the caller passes each validation frame exactly once.
Returns {"mAP": float, "per_class": {name: {"AP", "num_gt", "num_det", "num_tp", "num_fp",
"precision", "recall", "iou_threshold"}}, "average_precision_mode", "ap_integrate_compat",
"num_images"}; AP and mAP are fractions in [0, 1]; num_gt and num_det count the boxes left by
the size filter; precision and recall are those after all of the class's detections (0 when
there are none); iou_threshold is the float32-rounded threshold used. `format_table(result)`
renders a table in %.

Procedure (the original's `ComputeMetrics`, per class c):
  1. Size filter (`evaluation_box_config[c]`): a detection or ground-truth box with height
     (y2 - y1) < minimum_height, width < minimum_width, height > maximum_height or width >
     maximum_width is removed (ground truth is removed, not ignored: a detection on it is a
     false positive unless the detection is itself filtered). Then coordinates are rounded to
     integers (round half to even, as Python's round).
  2. Detections sorted by descending confidence (as float32, the original's storage). Each one
     takes the ground truth of its image with the highest IoU (VOC "+1 pixel" areas: borders
     included); it is a true positive if that IoU >= minimum_detection_ground_truth_overlap[c]
     and that ground truth is not matched yet, otherwise a false positive (no fall-back to the
     next best ground truth).
  3. precision_k = TP_k / k, recall_k = TP_k / num_gt over the sorted detections.
  4. AP: "SAMPLE" = mean over t in {0, 0.1, ..., 1} of the highest precision with recall >= t
     (0 if none): Pascal VOC 2007's 11 points. "INTEGRATE" = area under the precision envelope
     (Pascal VOC 2010): sum over recall steps of (r_k - r_{k-1}) x max precision at recall >=
     r_k, starting from recall 0.
  5. A class without ground truth has AP 0 (a warning is logged); mAP = plain mean over all
     target classes.

Config (`default_evaluation_config(class_names)`; per-class entries, or a "default" entry):
  {"minimum_detection_ground_truth_overlap": {class: IoU threshold in [0, 1]},
   "evaluation_box_config": {class: {"minimum_height", "maximum_height", "minimum_width",
                                     "maximum_width"}},   # pixels, integers >= 0
   "average_precision_mode": "SAMPLE" | "INTEGRATE",
   "ap_integrate_compat": False}
The training loop's keys of the original's evaluation_config (validation_period_during_training,
first_validation_epoch, early_stopping_patience_steps) are accepted and not read here. The
original requires both per-class maps; the defaults here are IoU 0.5 and the documentation's box
config 10 / 9999 / 10 / 9999. Thresholds are rounded to float32, as the original's protobuf
fields are, so a spec's numbers compare exactly as they did there.

Differences from the original (quirk numbers of the reference notes):
  - INTEGRATE is the standard VOC2010 area (Q4 fixed): the original dropped the recall interval
    [0, r_0] and took each interval's precision from its left end, so 1 GT + 1 TP scored 0.
    `ap_integrate_compat: True` reproduces its numbers. SAMPLE is unchanged (the default mode
    and the one users compare).
  - Kept (Q9): removed-not-ignored ground truth, integer rounding, the +1 IoU. Kept (Q10):
    classes without ground truth count as AP 0 in the mAP, now with a warning.
  - Every detection is matched (Q12: the original's non-verbose path matched only the first).
  - Ties: equal float32 confidences keep (image order, detection order) via a stable sort;
    the original's quicksort left their order unspecified.
  - Frames are whatever the caller passes (Q11: the original's loops skipped the last N mod B
    frames during training and repeated up to B - 1 frames in standalone evaluation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from bpnet_jax.errors import ConfigError

log = logging.getLogger(__name__)

AP_MODES = ("SAMPLE", "INTEGRATE")
BOX_KEYS = ("minimum_height", "maximum_height", "minimum_width", "maximum_width")
TRAINING_LOOP_KEYS = ("validation_period_during_training", "first_validation_epoch",
                      "early_stopping_patience_steps")
NUM_RECALL_POINTS = 11


def default_evaluation_config(class_names: Sequence[str] | None = None) -> dict:
  """IoU 0.5, box config 10 / 9999 / 10 / 9999 per class (or one "default" entry), SAMPLE."""
  names = list(class_names) if class_names else ["default"]
  return {
      "minimum_detection_ground_truth_overlap": {n: 0.5 for n in names},
      "evaluation_box_config": {n: {"minimum_height": 10, "maximum_height": 9999,
                                    "minimum_width": 10, "maximum_width": 9999} for n in names},
      "average_precision_mode": "SAMPLE",
      "ap_integrate_compat": False,
  }


class ClassEval(NamedTuple):
  iou_threshold: float
  min_h: float
  max_h: float
  min_w: float
  max_w: float


class EvalParams(NamedTuple):
  mode: str
  integrate_compat: bool
  classes: tuple


def _as_dict(value: Any, where: str) -> dict:
  if hasattr(value, "to_dict") and not isinstance(value, Mapping):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
  return dict(value)


def _number(value: Any, key: str, lo: float, hi: float | None = None,
            integer: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ConfigError(f"{key}: expected a number, got {value!r}")
  v = float(value)
  if not math.isfinite(v) or v < lo or (hi is not None and v > hi):
    raise ConfigError(f"{key}: expected a value in [{lo}, {hi if hi is not None else 'inf'}], "
                      f"got {value!r}")
  if integer and v != int(v):
    raise ConfigError(f"{key}: expected an integer, got {value!r}")
  return v


def _per_class(table: dict, name: str, where: str) -> tuple[Any, str]:
  key = name if name in table else "default"
  if key not in table:
    raise ConfigError(f"{where}.{name}: missing (and no 'default' entry)")
  return table[key], f"{where}.{key}"


def resolve_evaluation_config(config: Any, class_names: Sequence[str]) -> EvalParams:
  """Validates `config` for `class_names`; ConfigError (a ValueError) names the key."""
  cfg = _as_dict(config, "evaluation_config")
  known = ("minimum_detection_ground_truth_overlap", "evaluation_box_config",
           "average_precision_mode", "ap_integrate_compat") + TRAINING_LOOP_KEYS
  for key in cfg:
    if key not in known:
      raise ConfigError(f"evaluation_config.{key}: unknown key (expected one of {list(known)})")
  names = list(class_names)
  if not names:
    raise ConfigError("class_names: expected at least one target class")
  if len(set(names)) != len(names):
    raise ConfigError(f"class_names: duplicate names in {names}")
  mode = cfg.get("average_precision_mode", "SAMPLE")
  if not isinstance(mode, str) or mode.upper() not in AP_MODES:
    raise ConfigError(f"evaluation_config.average_precision_mode: expected one of {AP_MODES}, "
                      f"got {mode!r}")
  compat = cfg.get("ap_integrate_compat", False)
  if not isinstance(compat, (bool, np.bool_)):
    raise ConfigError(f"evaluation_config.ap_integrate_compat: expected true or false, "
                      f"got {compat!r}")
  tables = {}
  for key in ("minimum_detection_ground_truth_overlap", "evaluation_box_config"):
    if key not in cfg:
      raise ConfigError(f"evaluation_config.{key}: missing (one entry per target class, or "
                        "'default')")
    tables[key] = _as_dict(cfg[key], f"evaluation_config.{key}")
    for name in tables[key]:
      if name != "default" and name not in names:
        raise ConfigError(f"evaluation_config.{key}.{name}: not a target class (classes: "
                          f"{names})")
  classes = []
  for name in names:
    value, where = _per_class(tables["minimum_detection_ground_truth_overlap"], name,
                              "evaluation_config.minimum_detection_ground_truth_overlap")
    # The original's protobuf float: the threshold compares as its float32 value.
    iou = float(np.float32(_number(value, where, 0.0, 1.0)))
    box, where = _per_class(tables["evaluation_box_config"], name,
                            "evaluation_config.evaluation_box_config")
    box = _as_dict(box, where)
    for key in box:
      if key not in BOX_KEYS:
        raise ConfigError(f"{where}.{key}: unknown key (expected one of {list(BOX_KEYS)})")
      _number(box[key], f"{where}.{key}", 0.0, integer=True)
    missing = [k for k in BOX_KEYS if k not in box]
    if missing:
      raise ConfigError(f"{where}.{missing[0]}: missing")
    for lo, hi in (("minimum_height", "maximum_height"), ("minimum_width", "maximum_width")):
      if box[lo] > box[hi]:
        raise ConfigError(f"{where}.{lo}: {box[lo]} exceeds {hi} {box[hi]}")
    classes.append(ClassEval(iou, float(box["minimum_height"]), float(box["maximum_height"]),
                             float(box["minimum_width"]), float(box["maximum_width"])))
  return EvalParams(mode.upper(), bool(compat), tuple(classes))


def validate_evaluation_config(config: Any, class_names: Sequence[str]) -> None:
  """Raises ConfigError (a ValueError) with a one-line message naming the offending key."""
  resolve_evaluation_config(config, class_names)


# --------------------------------------------------------------------------------------------
# Inputs


def _frames(detections_by_image: Any, ground_truth_by_image: Any) -> list[tuple[list, list]]:
  """[(detections, ground truth)] per image, in the ground truth's order."""
  if isinstance(ground_truth_by_image, Mapping) or isinstance(detections_by_image, Mapping):
    if not (isinstance(ground_truth_by_image, Mapping)
            and isinstance(detections_by_image, Mapping)):
      raise ValueError("detections_by_image and ground_truth_by_image: expected both mappings "
                       "or both sequences")
    extra = [k for k in detections_by_image if k not in ground_truth_by_image]
    if extra:
      raise ValueError(f"detections_by_image: image {extra[0]!r} has no ground-truth entry")
    return [(list(detections_by_image.get(k, ())), list(v))
            for k, v in ground_truth_by_image.items()]
  dets, gts = list(detections_by_image), list(ground_truth_by_image)
  if len(dets) != len(gts):
    raise ValueError(f"detections_by_image: {len(dets)} images, ground_truth_by_image: "
                     f"{len(gts)}")
  return [(list(d), list(g)) for d, g in zip(dets, gts)]


def _class_index(entry: Mapping, names: list, lookup: dict, where: str) -> int | None:
  """The entry's class index, None for a class outside the targets (by name)."""
  name = entry.get("class_name")
  cid = entry.get("class_id")
  if name is None and cid is None:
    raise ValueError(f"{where}: expected a 'class_name' or 'class_id'")
  if cid is not None:
    if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) \
        or not 0 <= cid < len(names):
      raise ValueError(f"{where}: class_id {cid!r} is not in [0, {len(names)})")
    if name is not None and name != names[cid]:
      raise ValueError(f"{where}: class_id {cid} is {names[cid]!r}, class_name says {name!r}")
    return int(cid)
  return lookup.get(name)


def _box(entry: Mapping, where: str) -> list[float]:
  box = entry.get("box")
  try:
    values = [float(v) for v in box]
  except (TypeError, ValueError):
    values = []
  if len(values) != 4 or not all(math.isfinite(v) for v in values):
    raise ValueError(f"{where}: expected 'box' = 4 finite numbers (x1, y1, x2, y2), got {box!r}")
  return values


def _collect(frames, names):
  """Per class: detections (frame, confidence, box (4,)) and ground truth (frame, box (4,))."""
  lookup = {n: i for i, n in enumerate(names)}
  det = [([], [], []) for _ in names]
  gt = [([], []) for _ in names]
  for f, (dets, gts) in enumerate(frames):
    for k, d in enumerate(dets):
      where = f"detections_by_image[{f}][{k}]"
      c = _class_index(d, names, lookup, where)
      if c is None:
        raise ValueError(f"{where}: class_name {d.get('class_name')!r} is not a target class")
      conf = d.get("confidence")
      if isinstance(conf, bool) or not isinstance(conf, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: expected a numeric 'confidence', got {conf!r}")
      det[c][0].append(f)
      det[c][1].append(float(conf))
      det[c][2].append(_box(d, where))
    for k, g in enumerate(gts):
      where = f"ground_truth_by_image[{f}][{k}]"
      if g.get("dontcare", False):
        continue
      c = _class_index(g, names, lookup, where)
      if c is None:
        continue                      # not a target class: dropped, as unmapped labels were
      gt[c][0].append(f)
      gt[c][1].append(_box(g, where))
  out = []
  for (df, dc, db), (gf, gb) in zip(det, gt):
    out.append((np.asarray(df, np.int64), np.asarray(dc, np.float64),
                np.asarray(db, np.float64).reshape(-1, 4),
                np.asarray(gf, np.int64), np.asarray(gb, np.float64).reshape(-1, 4)))
  return out


# --------------------------------------------------------------------------------------------
# Matching and AP


def _size_ok(boxes: np.ndarray, p: ClassEval) -> np.ndarray:
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  return (h >= p.min_h) & (w >= p.min_w) & (h <= p.max_h) & (w <= p.max_w)


def iou_plus_one(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(A, B) IoU with the VOC "+1 pixel" convention (borders included) for (A, 4), (B, 4)."""
  iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1.0
  ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1.0
  inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
  area_a = (a[:, 2] - a[:, 0] + 1.0) * (a[:, 3] - a[:, 1] + 1.0)
  area_b = (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)
  return inter / (area_a[:, None] + area_b[None, :] - inter)


def match_class(det_frame: np.ndarray, det_conf: np.ndarray, det_box: np.ndarray,
                gt_frame: np.ndarray, gt_box: np.ndarray,
                iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """One class's greedy matching: (order (D,) by descending confidence, tp (D,) bool in that
  order). Boxes already filtered and rounded."""
  order = np.argsort(-det_conf.astype(np.float32), kind="stable")
  n = len(order)
  best_gt = np.full(n, -1, np.int64)          # per detection (original index): matched GT row
  best_iou = np.full(n, -np.inf)
  if n and len(gt_frame):
    gt_order = np.argsort(gt_frame, kind="stable")
    frames, first = np.unique(gt_frame[gt_order], return_index=True)
    bounds = np.append(first, len(gt_order))
    slot = np.searchsorted(frames, det_frame)
    has = (slot < len(frames)) & (frames[np.minimum(slot, len(frames) - 1)] == det_frame)
    for s in np.unique(slot[has]):
      rows = gt_order[bounds[s]:bounds[s + 1]]            # this image's GT, in input order
      d = np.flatnonzero(has & (slot == s))
      iou = iou_plus_one(det_box[d], gt_box[rows])
      k = np.argmax(iou, axis=1)                           # first of equal overlaps
      best_gt[d] = rows[k]
      best_iou[d] = iou[np.arange(len(d)), k]
  # A detection is a TP when it reaches the threshold and is the first (by confidence) to
  # claim its best ground truth; later claims and misses are FPs.
  hits = order[best_iou[order] >= iou_threshold]
  _, first_claim = np.unique(best_gt[hits], return_index=True)
  tp_det = np.zeros(n, bool)
  tp_det[hits[first_claim]] = True
  return order, tp_det[order]


def average_precision(tp: np.ndarray, num_gt: int, mode: str = "SAMPLE",
                      integrate_compat: bool = False) -> float:
  """AP from the TP flags of detections sorted by descending confidence (see module doc)."""
  if num_gt == 0 or len(tp) == 0:
    return 0.0
  ctp = np.cumsum(tp)
  precision = ctp / np.arange(1, len(tp) + 1)
  recall = ctp / num_gt
  if mode == "SAMPLE":
    total = 0.0
    for t in np.linspace(0.0, 1.0, NUM_RECALL_POINTS):
      above = precision[recall >= t]
      total += float(above.max()) if above.size else 0.0
    return total / NUM_RECALL_POINTS
  if integrate_compat:
    # The original's variant: precision of each recall step taken from its left end, the
    # interval [0, r_0] not counted.
    levels, first = np.unique(recall, return_index=True)
    if len(levels) < 2:
      return 0.0
    seg = np.maximum.reduceat(precision, first)[:-1]
    envelope = np.maximum.accumulate(seg[::-1])[::-1]
    return float(np.sum(envelope * np.diff(levels)))
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  step = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def evaluate(detections_by_image: Any, ground_truth_by_image: Any, config: Any,
             class_names: Sequence[str]) -> dict:
  """Per-class AP and mAP (see the module docstring for inputs, procedure and output)."""
  params = resolve_evaluation_config(config, class_names)
  names = list(class_names)
  frames = _frames(detections_by_image, ground_truth_by_image)
  per_class = {}
  for name, p, (df, dc, db, gf, gb) in zip(names, params.classes, _collect(frames, names)):
    keep = _size_ok(db, p)
    df, dc, db = df[keep], dc[keep], np.round(db[keep])
    keep = _size_ok(gb, p)
    gf, gb = gf[keep], np.round(gb[keep])
    _, tp = match_class(df, dc, db, gf, gb, p.iou_threshold)
    num_gt, num_tp = len(gf), int(tp.sum())
    if num_gt == 0:
      log.warning("class %r has no ground truth (after the size filter): AP 0 in the mAP", name)
    per_class[name] = {
        "AP": average_precision(tp, num_gt, params.mode, params.integrate_compat),
        "num_gt": num_gt,
        "num_det": len(tp),
        "num_tp": num_tp,
        "num_fp": len(tp) - num_tp,
        "precision": num_tp / len(tp) if len(tp) else 0.0,
        "recall": num_tp / num_gt if num_gt else 0.0,
        "iou_threshold": p.iou_threshold,
    }
  return {
      "mAP": float(np.mean([v["AP"] for v in per_class.values()])),
      "per_class": per_class,
      "average_precision_mode": params.mode,
      "ap_integrate_compat": params.integrate_compat,
      "num_images": len(frames),
  }


def format_table(result: Mapping) -> str:
  """A per-class table (AP, precision and recall in %) with the mAP underneath."""
  header = ("class", "AP (%)", "GT", "detections", "TP", "FP", "precision (%)", "recall (%)",
            "IoU")
  rows = [(name, f"{v['AP'] * 100:.2f}", str(v["num_gt"]), str(v["num_det"]), str(v["num_tp"]),
           str(v["num_fp"]), f"{v['precision'] * 100:.2f}", f"{v['recall'] * 100:.2f}",
           f"{v['iou_threshold']:.2f}") for name, v in result["per_class"].items()]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def line(cells):
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  mode = result.get("average_precision_mode", "SAMPLE")
  if mode == "INTEGRATE" and result.get("ap_integrate_compat"):
    mode += ", TAO-compatible"
  out = [line(header), rule] + [line(r) for r in rows]
  out.append(f"mAP (%): {result['mAP'] * 100:.2f} ({mode}, {result.get('num_images', '?')} "
             "images)")
  return "\n".join(out)
