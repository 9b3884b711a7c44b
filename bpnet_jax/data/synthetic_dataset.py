"""Make a synthetic dataset and point a config at it: the one helper the demo, the tests, the
benchmarks and the experiments share.

  paths = make_dataset(root, num_images=150, seed=0, width=320, height=240, style="demo")
  config = point_config(config, paths)

`root` ends up with data/ (images, COCO JSON, dataset_spec.json, masks) and records/
(train-fold-000-of-001, test-fold-000-of-001 and their summaries). Parts already present are
reused, so a second call costs nothing.
"""

from __future__ import annotations

import json
import os

from bpnet_jax.data import convert, synthetic

TRAIN_RECORDS = "train-fold-000-of-001"
TEST_RECORDS = "test-fold-000-of-001"


def make_dataset(root: str, num_images: int, seed: int = 0, width: int = 320, height: int = 240,
                 test_fraction: float = 0.2, style: str = "default", workers: int | None = None,
                 progress: bool = False) -> dict:
  """Synthetic images + records under `root` (skipped where already present).

  Returns {"data", "spec", "records", "summaries": {split: conversion summary}}; the test
  split's records exist only when test_fraction > 0.
  """
  data = os.path.join(root, "data")
  spec = os.path.join(data, "dataset_spec.json")
  if not os.path.exists(spec):
    synthetic.make_synthetic(data, num_images, seed=seed, width=width, height=height,
                             test_fraction=test_fraction, style=style, progress=progress)
  records = os.path.join(root, "records")
  summaries = {}
  for mode in ("train", "test") if test_fraction > 0 else ("train",):
    base = os.path.join(records, mode)
    if not os.path.exists(base + ".summary.json"):
      convert.convert(spec, base, mode, generate_masks=True, workers=workers)
    with open(base + ".summary.json") as f:
      summaries[mode] = json.load(f)
  return {"data": data, "spec": spec, "records": records, "summaries": summaries}


def point_config(config, paths: dict, validation: bool = True):
  """A copy of `config` reading the dataset made by `make_dataset`."""
  config = config.copy_and_resolve_references()
  d = config.dataloader.dataset_config
  d.root_data_path = paths["data"]
  d.train_records_folder_path = d.val_records_folder_path = paths["records"]
  d.train_records_path = (TRAIN_RECORDS,)
  d.val_records_path = (TEST_RECORDS,) if validation and "test" in paths["summaries"] else ()
  d.dataset_specs = {"coco": paths["spec"]}
  return config
