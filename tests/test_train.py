import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import tiny_train_config

from bpnet_jax import checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _tb_scalars(workdir):
  """{tag: [(step, value)]} read from the TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in ev.summary.value:
        out.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return out


@pytest.fixture(scope="module")
def trained(synth_records, tmp_path_factory):
  cfg = tiny_train_config(synth_records, num_epoch=2, checkpoint_n_epoch=1,
                          validation_every_n_epoch=1)
  workdir = str(tmp_path_factory.mktemp("run"))
  out = train.train(cfg, workdir, progress=False)
  return cfg, workdir, out


def test_training_writes_metrics_checkpoints_and_config(trained):
  cfg, workdir, out = trained
  spe = out["steps_per_epoch"]
  assert out["step"] == out["last_step"] == 2 * spe
  # Epoch boundaries, checkpoints and validation do not recompile the step.
  assert out["train_step_compilations"] == 1
  lines = [l for l in _lines(workdir) if "loss" in l]
  assert [l["step"] for l in lines] == list(range(1, 2 * spe + 1))
  for key in ("epoch", "loss", "cmap_loss_stage1", "paf_loss_stage2", "lr", "images_per_sec",
              "regularization_loss"):
    assert key in lines[0]
  assert all(np.isfinite(l["loss"]) for l in lines)
  val = [l for l in _lines(workdir) if "val_loss" in l]
  assert [l["step"] for l in val] == [spe, 2 * spe] and np.isfinite(val[0]["val_loss"])
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [spe, 2 * spe]
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["trainer"]["num_epoch"] == 2
  tb = _tb_scalars(workdir)
  assert [s for s, _ in tb["loss/loss"]] == list(range(1, 2 * spe + 1))
  np.testing.assert_allclose([v for _, v in tb["loss/loss"]], [l["loss"] for l in lines],
                             rtol=1e-5)


def test_learning_rate_follows_the_schedule(trained):
  cfg, workdir, out = trained
  from bpnet_jax import schedules
  sched = schedules.from_config(cfg.optimizer.learning_rate_schedule, out["steps_per_epoch"],
                                out["last_step"])
  for l in _lines(workdir):
    if "lr" in l:
      assert l["lr"] == pytest.approx(float(sched(l["step"] - 1)), rel=1e-5)


def test_checkpoint_round_trip(trained, tmp_path):
  config, _, out = trained
  state = out["state"]
  mngr = checkpoint.checkpoint_manager(str(tmp_path), 2)
  checkpoint.save_checkpoint(mngr, state, {"next_index": 7}, {"epoch": 3}, config)
  mngr.close()
  step_dir = os.path.join(str(tmp_path), "checkpoints", str(int(state.step)))
  assert checkpoint.verify_manifest(step_dir) is None          # written once the save completed
  assert json.load(open(os.path.join(step_dir, "integrity.json")))["files"]
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=x.sharding), state)
  mngr, (restored, data, meta, step) = checkpoint.restore_latest(str(tmp_path), 2, abstract)
  mngr.close()
  assert data == {"next_index": 7} and meta == {"epoch": 3} and step == int(state.step)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_corrupt_latest_checkpoint_falls_back(trained, tmp_path, caplog):
  import shutil
  _, workdir, out = trained
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  latest = max(int(d) for d in os.listdir(os.path.join(copy, "checkpoints")))
  for f in glob.glob(os.path.join(copy, "checkpoints", str(latest), "state", "**"),
                     recursive=True):
    if os.path.isfile(f) and not f.endswith("_METADATA"):
      with open(f, "wb") as fh:       # truncated files: a checkpoint damaged on disk
        fh.write(b"")
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=x.sharding),
                                    out["state"])
  mngr, (_, _, meta, step) = checkpoint.restore_latest(copy, 5, abstract)
  mngr.close()
  assert step == out["steps_per_epoch"] and meta["epoch"] == 1
  assert any("unusable" in r.message for r in caplog.records)
  # The damaged step was moved aside, so a retrained step can be saved again.
  assert os.listdir(os.path.join(copy, "corrupt_checkpoints")) == [str(latest)]
  assert str(latest) not in os.listdir(os.path.join(copy, "checkpoints"))


def test_one_device_and_four_devices_agree(synth_records, tmp_path):
  assert len(jax.devices()) == 4
  losses = {}
  for n in (1, 4):
    cfg = tiny_train_config(synth_records, num_epoch=1, checkpoint_n_epoch=1)
    out = train.train(cfg, str(tmp_path / f"d{n}"), devices=jax.devices()[:n], progress=False)
    losses[n] = [l["loss"] for l in _lines(str(tmp_path / f"d{n}"))]
    assert out["step"] >= 3
  np.testing.assert_allclose(losses[1], losses[4], rtol=2e-4)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(synth_records, tmp_path):
  cfg = tiny_train_config(synth_records, num_epoch=4, checkpoint_n_epoch=1)
  s = cfg.optimizer.learning_rate_schedule
  # The LR grows 2e13-fold over the run: sane for the first epoch, explosive after.
  s.soft_start, s.annealing = 1.0, 1.0
  s.min_learning_rate, s.base_learning_rate = 5e-6, 1e8
  with pytest.raises(train.TrainingError, match="loss became"):
    train.train(cfg, str(tmp_path), progress=False)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints"))
  lines = _lines(str(tmp_path))
  assert steps and all(np.isfinite(l["loss"]) for l in lines)
  assert max(steps) <= lines[-1]["step"]


def test_pretrained_weights_load_by_name(trained, synth_records, tmp_path, capsys):
  _, workdir, out = trained
  cfg = tiny_train_config(synth_records, num_epoch=1, checkpoint_n_epoch=1,
                          pretrained_weights=workdir)
  cfg.model.stages = 3                     # stage 3 and the renamed outputs are new
  cfg.trainer.num_epoch = 1
  fresh = train.train(cfg, str(tmp_path), progress=False)
  err = capsys.readouterr().err
  assert "pretrained weights from" in err and "skipped" in err
  assert fresh["step"] == fresh["steps_per_epoch"]


def _run_main(workdir, synth, extra=()):
  data, spec, records = synth
  args = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={ROOT}/configs/demo.py",
          f"--workdir={workdir}",
          f"--config.dataloader.dataset_config.train_records_folder_path={records}",
          "--config.dataloader.dataset_config.train_records_path=('train-fold-000-of-001',)",
          f"--config.dataloader.dataset_config.dataset_specs.coco={spec}",
          "--config.dataloader.max_image_size=(120, 160)",
          "--config.dataloader.image_config.height=64", "--config.dataloader.image_config.width=64",
          "--config.dataloader.pose_config.target_shape=(8, 8)",
          "--config.inference.input_shape=(64, 64)",
          "--config.trainer.validation_every_n_epoch=0", "--config.trainer.num_epoch=6",
          "--config.trainer.checkpoint_n_epoch=1", "--config.trainer.summary_every_n_steps=1",
          "--config.trainer.max_ckpt_to_keep=10"] + list(extra)
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _final_params(workdir):
  tree = checkpoint.read_state(workdir)
  return {train.model_lib.path_str(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path({"p": tree["params"], "b": tree["batch_stats"],
                                                "o": tree["opt_state"]})[0]}


def test_resume_after_sigkill_equals_an_uninterrupted_run(synth_records, tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  p = _run_main(full, synth_records)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  lines = _lines(full)
  last_step = lines[-1]["step"]
  spe = last_step // 6
  target = 2 * spe + spe // 2                  # in the middle of epoch 3
  p = _run_main(killed, synth_records)
  deadline = time.time() + 300
  while time.time() < deadline:
    path = os.path.join(killed, "metrics.jsonl")
    if os.path.exists(path) and any(json.loads(l)["step"] >= target for l in open(path)
                                    if l.strip()):
      break
    time.sleep(0.02)
  os.kill(p.pid, signal.SIGKILL)
  p.communicate()
  done = max(json.loads(l)["step"] for l in open(os.path.join(killed, "metrics.jsonl")))
  assert done < last_step, "the run finished before it could be killed"
  p = _run_main(killed, synth_records)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  assert "resuming from checkpoint" in err
  a, b = _final_params(full), _final_params(killed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert [l["step"] for l in _lines(killed)] == list(range(1, last_step + 1))


def test_command_line_overrides_reach_the_saved_config(synth_records, tmp_path):
  # (an inference key: the override path is what is tested, and the training step stays the
  # one the other tests compiled)
  p = _run_main(str(tmp_path), synth_records, ["--config.trainer.num_epoch=1",
                                               "--config.inference.heatmap_threshold=0.25"])
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["trainer"]["num_epoch"] == 1 and saved["inference"]["heatmap_threshold"] == 0.25
  assert "trained to step" in out


def test_finetuning_starts_from_the_given_checkpoint_and_epoch(trained, synth_records, tmp_path,
                                                               capsys):
  _, workdir, out = trained
  spe = out["steps_per_epoch"]
  cfg = tiny_train_config(synth_records, num_epoch=2, checkpoint_n_epoch=1)
  ft = cfg.trainer.finetuning_config
  ft.is_finetune_exp, ft.checkpoint_path, ft.ckpt_epoch_num = True, \
      os.path.join(workdir, "checkpoints", str(spe)), 1
  res = train.train(cfg, str(tmp_path), progress=False)
  assert "fine-tuning from" in capsys.readouterr().err
  assert [l["step"] for l in _lines(str(tmp_path))] == list(range(spe + 1, 2 * spe + 1))
  assert res["step"] == 2 * spe


def test_bfloat16_train_steps(synth_records):
  cfg = tiny_train_config(synth_records, compute_dtype="bfloat16")
  s = train.setup(cfg, devices=jax.devices()[:1])
  tx_fn = lambda p: train.optimizer_lib.optimizer_from_config(cfg, p, s.schedule)
  state = train.init_state(cfg, s.model, tx_fn, 64, 64)
  step = jax.jit(train.make_train_step(cfg, s.skeleton, s.model, tx_fn(state.params), s.schedule))
  it = train.input_pipeline.make_iterator(s.dataset, cfg.dataloader.batch_size)
  for _ in range(2):
    state, m = step(state, next(it))
  assert np.isfinite(float(m["loss"])) and int(state.step) == 2
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
