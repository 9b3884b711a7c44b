"""Original-style BodyPoseNet post-processor, for comparison only.

A deliberately straightforward (Python-loop) re-statement of the NVIDIA TAO BodyPoseNet
post-processor on its Keras path, written from a description of the original's steps
(numbered below as in that description). It is the slow baseline that
`benchmarks/decode.py` times `bpnet_jax.decode` against, and a cross-check for tests; it is
not part of the library and not tuned for speed.

Steps (the original's section numbers in brackets):
  upsample both maps x`upsample` with cubic cv2.resize [1.5], drop the background channel,
  smooth with the fixed 5x5 kernel (zero padding), 3x3 max-pool NMS by exact equality, threshold
  the raw value [2.1a], gather peaks in channel order [2.2], score limb candidates with a
  10-sample line integral and assign them greedily [2.3], assemble people [2.4], map back to
  network-input pixels and score people by 1 - 1/S [2.5].

Same return contract as `bpnet_jax.decode`: a list of dict(keypoints=(J, 3) float [x, y, score],
score=float), missing joints [0, 0, 0]. Coordinates follow the original: peak pixel p of the
upsampled map maps to p * stride / upsample with no half-pixel shift, which with
upsample == stride is the network-input pixel p.
"""

import math

import cv2
import numpy as np
from scipy import ndimage


def gaussian_kernel(size=5, sigma=3.0):
  """The original's `get_gaussian_kernel(5, 18, sigma=3)`: NOT a sigma-3 Gaussian (2.1a)."""
  interval = (2 * sigma + 1.0) / size
  x = np.linspace(-sigma - interval / 2.0, sigma + interval / 2.0, size + 1)   # [-3.7, 3.7]
  cdf = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
  k1 = np.diff(cdf)
  k2 = np.sqrt(np.outer(k1, k1))
  return k2 / k2.sum()


def _resize(maps, upsample):
  """cv2 cubic resize of an (h, w, C) map: all channels at once, as the original; in chunks of
  4 channels if this cv2 build refuses that many."""
  fy, fx = upsample
  def resize(m):
    out = cv2.resize(np.ascontiguousarray(m), None, fx=fx, fy=fy, interpolation=cv2.INTER_CUBIC)
    return out[..., None] if out.ndim == 2 else out
  try:
    return resize(maps)
  except cv2.error:
    return np.concatenate([resize(maps[..., i:i + 4]) for i in range(0, maps.shape[-1], 4)], -1)


def find_peaks(heat, threshold):
  """Per-joint peak lists of (x, y, score, id) and the stacked (N, 4) array (2.1a, 2.2)."""
  kernel = gaussian_kernel().astype(np.float32)
  num_joints = heat.shape[-1]
  peaks_map = np.zeros_like(heat)
  for c in range(num_joints):
    smooth = ndimage.correlate(heat[..., c], kernel, mode="constant", cval=0.0)
    pooled = ndimage.maximum_filter(smooth, size=3, mode="constant", cval=-np.inf)
    peaks_map[..., c] = np.where(smooth == pooled, heat[..., c], 0.0)
  ys, xs, cs = np.where(peaks_map > threshold)          # row-major over (y, x, c)
  order = np.argsort(cs, kind="stable")                 # by channel, row-major inside
  peaks = [[] for _ in range(num_joints)]
  candidates = []
  for i, n in enumerate(order):
    x, y, c = int(xs[n]), int(ys[n]), int(cs[n])
    peak = (x, y, float(heat[y, x, c]), i)
    peaks[c].append(peak)
    candidates.append(peak)
  return peaks, np.array(candidates, np.float64).reshape(-1, 4)


def find_connections(peaks, paf, topology, paf_threshold, num_samples, sample_ratio):
  """Per limb: (K, 3) rows (start_id, end_id, score), greedily assigned (2.3)."""
  connections = []
  for px, py, s, e in topology:
    cand_a, cand_b = peaks[s], peaks[e]
    if not cand_a or not cand_b:
      connections.append(np.zeros((0, 3)))
      continue
    scored = []                                           # (flat index b*nA + a, score)
    for b, pb in enumerate(cand_b):
      for a, pa in enumerate(cand_a):
        v = np.array([pb[0] - pa[0], pb[1] - pa[1]], np.float64)
        u = v / (np.linalg.norm(v) + 1e-6)
        samples = []
        for t in range(num_samples):
          x = int(np.round(pa[0] + t * v[0] / (num_samples - 1)))
          y = int(np.round(pa[1] + t * v[1] / (num_samples - 1)))
          samples.append(paf[y, x, px] * u[0] + paf[y, x, py] * u[1])
        samples = np.array(samples)
        qualified = samples > paf_threshold
        n_qual = int(qualified.sum())
        score = float(samples[qualified].sum()) / (n_qual + 1e-6)
        if score > 0 and n_qual > sample_ratio * num_samples:
          scored.append((b * len(cand_a) + a, score))
    # Descending = the reverse of an ascending argsort (ties: the later pair first).
    order = np.argsort([sc for _, sc in scored], kind="stable")[::-1]
    used_a, used_b, rows = set(), set(), []
    for n in order:
      flat, score = scored[n]
      b, a = divmod(flat, len(cand_a))
      ida, idb = cand_a[a][3], cand_b[b][3]
      if ida not in used_a and idb not in used_b:
        used_a.add(ida)
        used_b.add(idb)
        rows.append((ida, idb, score))
    connections.append(np.array(rows, np.float64).reshape(-1, 3))
  return connections


def connect_parts(connections, candidates, topology, num_joints, min_parts, min_mean_score):
  """(M, J+2) humans: peak id per joint (-1 missing), total score S, part count (2.4)."""
  humans = -np.ones((0, num_joints + 2))
  num_limbs = len(topology)
  for k, (_, _, s, e) in enumerate(topology):
    for a_id, b_id, c in connections[k]:
      found = [j for j in range(len(humans)) if humans[j][s] == a_id or humans[j][e] == b_id]
      if len(found) == 1:
        j = found[0]
        if humans[j][e] != b_id:
          humans[j][e] = b_id
          humans[j][-1] += 1
          humans[j][-2] += candidates[int(b_id), 2] + c
      elif len(found) == 2:
        j1, j2 = found
        membership = (humans[j1][:-2] >= 0).astype(int) + (humans[j2][:-2] >= 0).astype(int)
        if not np.any(membership == 2):               # disjoint: merge j2 into j1
          humans[j1][:-2] += humans[j2][:-2] + 1
          humans[j1][-2:] += humans[j2][-2:]
          humans[j1][-2] += c
          humans = np.delete(humans, j2, axis=0)
        else:                                         # no check that it was already b_id
          humans[j1][e] = b_id
          humans[j1][-1] += 1
          humans[j1][-2] += candidates[int(b_id), 2] + c
      elif not found and k < num_limbs - 2:            # the last two limbs never start a person
        row = -np.ones(num_joints + 2)
        row[s], row[e] = a_id, b_id
        row[-1] = 2
        row[-2] = candidates[int(a_id), 2] + candidates[int(b_id), 2] + c
        humans = np.vstack([humans, row])
  keep = [j for j in range(len(humans))
          if not (humans[j][-1] < min_parts or humans[j][-2] / humans[j][-1] < min_mean_score)]
  return humans[keep]


def decode_reference(heatmap, paf, skeleton=None, stride=8, upsample=(8, 8),
                     heatmap_threshold=0.1, paf_threshold=0.05, paf_num_samples=10,
                     paf_sample_ratio=0.8, min_parts=4, min_mean_score=0.4):
  """Original-style decode of one image's (h, w, J+1) heatmap and (h, w, 2L) PAF."""
  if skeleton is None:
    from bpnet_jax.skeleton import load_skeleton
    skeleton = load_skeleton("bpnet_18joints")
  num_joints = skeleton.num_joints
  topology = [tuple(int(v) for v in row) for row in skeleton.topology]
  heat = _resize(np.asarray(heatmap, np.float32), upsample)[..., :num_joints]
  paf = _resize(np.asarray(paf, np.float32), upsample)

  peaks, candidates = find_peaks(heat, heatmap_threshold)
  connections = find_connections(peaks, paf, topology, paf_threshold, paf_num_samples,
                                 paf_sample_ratio)
  humans = connect_parts(connections, candidates, topology, num_joints, min_parts,
                         min_mean_score)

  # 1.5: [y-scale, x-scale] with the original's crossed axes (only matters if fy != fx).
  y_scale, x_scale = stride / upsample[1], stride / upsample[0]
  people = []
  for human in humans:
    kps = np.zeros((num_joints, 3), np.float32)
    for j in range(num_joints):
      if human[j] >= 0:
        x, y, score, _ = candidates[int(human[j])]
        kps[j] = (x_scale * x, y_scale * y, score)
    people.append(dict(keypoints=kps, score=float(1.0 - 1.0 / human[-2])))
  return people
