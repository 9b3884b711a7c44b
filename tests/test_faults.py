"""Faults a user hits: damaged checkpoints, a diverging run, unwritable outputs, damaged record
files, out-of-range flags, unreadable inputs. Each ends in a clear one-line error (or a warning
and a correct recovery), a non-zero exit where it fails, and nothing lost or half-written."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
from conftest import tiny_train_config

from bpnet_jax import checkpoint, cli, train
from bpnet_jax.errors import TrainingError
from bpnet_jax.inference.predictor import Predictor


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _copy(workdir, tmp_path, name="w"):
  copy = str(tmp_path / name)
  shutil.copytree(workdir, copy)
  return copy


def _cli(capsys, *args):
  status = cli.main(list(args))
  captured = capsys.readouterr()
  return status, captured.out, captured.err


@pytest.mark.parametrize("damage", ["truncate", "metadata", "flip"])
def test_damaged_newest_checkpoint_is_moved_aside_and_retrained(trained_workdir, tmp_path,
                                                                damage, capsys, caplog):
  config, workdir = trained_workdir
  copy = _copy(workdir, tmp_path)
  last = _steps(copy)[-1]
  state_dir = os.path.join(copy, "checkpoints", str(last), "state")
  data = [f for f in glob.glob(os.path.join(state_dir, "**"), recursive=True)
          if os.path.isfile(f) and "/d/" in f]
  if damage == "truncate":
    open(data[0], "wb").close()
  elif damage == "metadata":
    os.remove(os.path.join(state_dir, "_METADATA"))
  else:                  # same size, a few bytes changed: only the integrity manifest sees it
    raw = bytearray(open(data[0], "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(data[0], "wb").write(bytes(raw))
  status, out, err = _cli(capsys, "train", f"--workdir={copy}", "--no_progress")
  assert status == 0, err
  assert f"trained to step {last}/{last}" in out
  warned = caplog.text          # (the CLI prints warnings to stderr; pytest captures logging)
  assert "unusable" in warned and os.path.join("corrupt_checkpoints", str(last)) in warned
  assert os.path.isdir(os.path.join(copy, "corrupt_checkpoints", str(last)))
  assert _steps(copy)[-1] == last             # the retrained step was saved again
  assert checkpoint.verify_manifest(os.path.join(copy, "checkpoints", str(last))) is None
  assert isinstance(Predictor.from_path(copy).predict(np.zeros((40, 50, 3), np.uint8)), list)


def test_every_checkpoint_damaged_retrains_from_scratch_and_saves(trained_workdir, tmp_path,
                                                                 capsys, caplog):
  _, workdir = trained_workdir
  copy = _copy(workdir, tmp_path)
  steps = _steps(copy)
  for step in steps:
    os.remove(os.path.join(copy, "checkpoints", str(step), "state", "_METADATA"))
  status, out, err = _cli(capsys, "train", f"--workdir={copy}", "--no_progress")
  assert status == 0, err
  assert _steps(copy) == [steps[-1]]
  assert sorted(os.listdir(os.path.join(copy, "corrupt_checkpoints"))) == sorted(map(str, steps))
  # The new checkpoint restores (run again: nothing to do, nothing moved).
  caplog.clear()
  status, out, err = _cli(capsys, "train", f"--workdir={copy}", "--no_progress")
  assert status == 0 and "unusable" not in caplog.text


def test_divergence_keeps_only_checkpoints_whose_parameters_give_a_finite_loss(
    synth_records, tmp_path):
  # A checkpoint every epoch while the LR explodes: parameters can be huge but finite (they pass
  # a finiteness check) and give a non-finite loss one step later; no such checkpoint may
  # survive as "good".
  cfg = tiny_train_config(synth_records, num_epoch=6, checkpoint_n_epoch=1)
  s = cfg.optimizer.learning_rate_schedule
  # The LR grows 2e13-fold over the run: sane at first, explosive at the end.
  s.soft_start, s.annealing = 1.0, 1.0
  s.min_learning_rate, s.base_learning_rate = 5e-6, 1e8
  workdir = str(tmp_path / "run")
  with pytest.raises(TrainingError) as e:
    train.train(cfg, workdir, progress=False)
  kept = _steps(workdir)
  message = str(e.value)
  assert "became" in message and (f"Checkpoint kept: step {kept[-1]}" in message if kept
                                  else "starts from scratch" in message)
  moved = os.listdir(os.path.join(workdir, "corrupt_checkpoints")) \
      if os.path.isdir(os.path.join(workdir, "corrupt_checkpoints")) else []
  # Every kept checkpoint's parameters are finite and give a finite loss on the next step.
  bad_step = int(message.split(" at step ")[1].split(" ")[0])
  assert all(k < bad_step - 1 for k in kept) and all(int(m) >= bad_step - 1 for m in moved)
  if kept:
    s.base_learning_rate = s.min_learning_rate                  # a sane LR from there
    cfg.trainer.num_epoch = 6
    out = train.train(cfg, workdir, progress=False)
    assert np.isfinite(out["metrics"]["loss"])


def test_unwritable_outputs_are_one_line_errors(trained_workdir, synth_records, tmp_path,
                                                capsys):
  _, workdir = trained_workdir
  data, spec, _ = synth_records
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  under = str(blocker / "sub")            # as root, a path under a regular file is unwritable
  cases = [
      ("inference", f"--model={workdir}", "--input_type=dir", f"--input={data}/test",
       f"--results_dir={under}", "--no_progress"),
      ("evaluate", f"--model={workdir}", f"--dataset_spec={spec}", f"--results_dir={under}",
       "--no_progress"),
      ("prune", f"--model={workdir}", f"-o={under}", "-nf=2", "-pg=2"),
      ("make_synthetic", f"--out={under}", "--num_images=2"),
      ("dataset_convert", f"-d={spec}", f"-o={under}/train", "--overwrite"),
      ("train", f"--workdir={under}", "--config=configs/demo.py"),
  ]
  for args in cases:
    status, _, err = _cli(capsys, *args)
    assert status == 2, args
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "a_file" in lines[0], (args, err)
  assert blocker.read_text() == "not a directory"


def test_damaged_record_files_are_one_line_errors(trained_workdir, synth_records, tmp_path,
                                                  capsys):
  config, _ = trained_workdir
  _, _, records = synth_records
  bad = tmp_path / "records"
  shutil.copytree(records, bad)
  path = bad / "train-fold-000-of-001"
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 3])
  cfg_path = tmp_path / "cfg.py"
  from conftest import write_config_file
  config = config.copy_and_resolve_references()
  config.dataloader.dataset_config.train_records_folder_path = str(bad)
  write_config_file(config, cfg_path)
  status, _, err = _cli(capsys, "train", f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}")
  assert status == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "train-fold-000-of-001" in lines[0], err
  assert not (tmp_path / "w").exists()           # an early failure leaves no workdir behind


def test_out_of_range_flags_and_unreadable_inputs(trained_workdir, tmp_path, capsys):
  _, workdir = trained_workdir
  for args in (("prune", f"--model={workdir}", f"-o={tmp_path / 'p'}", "-pth=nan"),
               ("prune", f"--model={workdir}", f"-o={tmp_path / 'p'}", "-pth=2"),
               ("prune", f"--model={workdir}", f"-o={tmp_path / 'p'}", "-pth=-1"),
               ("inference", f"--model={workdir}", "--input_type=dir", f"--input={tmp_path}",
                f"--results_dir={tmp_path / 'r'}", "--batch_size=0"),
               ("make_synthetic", f"--out={tmp_path / 's'}", "--num_images=0"),
               ("export", f"--model={workdir}", f"-o={tmp_path / 'm.onnx'}", "--batches=0")):
    status, _, err = _cli(capsys, *args)
    assert status == 2 and len(err.strip().splitlines()) == 1, (args, err)
  assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "a.jpg").write_bytes(b"not a jpeg")
  (broken / "b.png").write_bytes(b"")
  status, _, err = _cli(capsys, "inference", f"--model={workdir}", "--input_type=dir",
                        f"--input={broken}", f"--results_dir={tmp_path / 'r2'}",
                        "--no_progress")
  assert status == 2 and "none of the 2 inputs could be read" in err
  assert not (tmp_path / "r2").exists()
  status, _, err = _cli(capsys, "evaluate", f"--model={workdir}",
                        f"--dataset_spec={broken / 'a.jpg'}", f"--results_dir={tmp_path / 'e'}")
  assert status == 2 and len(err.strip().splitlines()) == 1


def test_invalid_annotation_json_in_evaluate_is_one_line(trained_workdir, synth_records,
                                                         tmp_path, capsys):
  _, workdir = trained_workdir
  data, spec, _ = synth_records
  spec_data = json.load(open(spec))
  bad_root = tmp_path / "data"
  shutil.copytree(data, bad_root)
  spec_data["root_directory_path"] = str(bad_root)
  (bad_root / spec_data["test_data"]["annotation_root_dir_path"]).write_text("{ not json")
  bad_spec = tmp_path / "spec.json"
  bad_spec.write_text(json.dumps(spec_data))
  status, _, err = _cli(capsys, "evaluate", f"--model={workdir}", f"--dataset_spec={bad_spec}",
                        f"--results_dir={tmp_path / 'e'}", "--no_progress")
  assert status == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and ".json" in lines[0], err


def test_calibration_tensor_of_the_wrong_shape_is_one_line(tmp_path):
  from bpnet_jax.errors import ExportError
  from bpnet_jax.export import int8
  path = str(tmp_path / "cal.npy")
  np.save(path, np.zeros((4, 32, 32, 3), np.float32))
  with pytest.raises(ExportError, match=r"shape \(4, 32, 32, 3\), expected \(N, 64, 96, 3\)"):
    int8.load_or_make_calibration_data(path, lambda: pytest.fail("must not recalibrate"),
                                       (64, 96))
  np.save(path, np.zeros((4, 64), np.float32))
  with pytest.raises(ExportError, match="expected"):
    int8.load_or_make_calibration_data(path, None)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
  def interrupted(argv):
    raise KeyboardInterrupt
  monkeypatch.setitem(cli.COMMANDS, "summary", interrupted)
  status, _, err = _cli(capsys, "summary", "--config=configs/demo.py")
  assert status == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err
