"""experiments/sweep.py: exit codes recorded per member, and the summary of a sweep directory
(table, JSON, plot) built from fake member directories; no training."""
import importlib.util
import json
import os
import subprocess
import sys

from PIL import Image

from tests import helpers

SCRIPT = os.path.join(helpers.REPO, "experiments", "sweep.py")


def _load_sweep():
  spec = importlib.util.spec_from_file_location("sweep_under_test", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep()


def _eval_row(sampler, steps, fd, acc, **extra):
  return {"step": 10, "sampler": sampler, "num_steps": steps, "guidance": 0.0, "fd_pixels": fd,
          "class_acc": acc, "num_samples": 40, "tag": "final", **extra}


def _fake_sweep(root, *, with_manifest=True):
  """Five members of a learning-rate x prediction sweep: a finished pipeline, a finished teacher
  run, one still running, one failed, one not started."""
  lrs_preds = [(0.001, "v"), (0.002, "v"), (0.001, "eps"), (0.002, "eps"), (0.004, "v")]
  names = [sweep.run_name(i, {"optim.learning_rate": lr, "model.prediction": p})
           for i, (lr, p) in enumerate(lrs_preds)]
  for name in names[:4]:
    os.makedirs(root / name)
  pipeline = [dict(_eval_row("ancestral", 8, 0.5, 0.99), method="teacher ancestral"),
              dict(_eval_row("student_alternating", 8, 0.25, 0.98), method="student alternating")]
  (root / names[0] / "comparison.json").write_text(json.dumps(pipeline))
  (root / names[1] / "final_eval.json").write_text(json.dumps([_eval_row("ancestral", 8, 0.4,
                                                                         0.97)]))
  os.makedirs(root / names[2] / "teacher" / "checkpoints" / "500")
  os.makedirs(root / names[3] / "checkpoints")
  if with_manifest:
    codes = [0, 0, None, 1, None]
    manifest = {"config": "configs/digits.py", "host": "elsewhere", "pid": 1, "members": [
        {"name": n, "overrides": {"optim.learning_rate": lr, "model.prediction": p},
         "command": [], "exit_code": c} for n, (lr, p), c in zip(names, lrs_preds, codes)]}
    (root / "sweep.json").write_text(json.dumps(manifest))
  return names


def test_summary_marks_every_member_and_writes_table_json_and_plot(tmp_path):
  names = _fake_sweep(tmp_path)
  text = sweep.summarize(str(tmp_path))
  summary = json.loads((tmp_path / "sweep_summary.json").read_text())
  status = {m["name"]: m["status"] for m in summary["members"]}
  assert status == {names[0]: "done", names[1]: "done", names[2]: "running",
                    names[3]: "failed (exit 1)", names[4]: "not started"}
  assert summary["swept"] == ["optim.learning_rate", "model.prediction"]
  assert summary["metrics"] == ["fd_pixels", "class_acc"]
  assert [r["method"] for r in summary["members"][0]["rows"]] == ["teacher ancestral",
                                                                  "student alternating"]
  assert summary["members"][1]["rows"][0]["fd_pixels"] == 0.4
  assert (tmp_path / "sweep_summary.md").read_text() == text.split("\nPlot of")[0]
  assert "5 members (2 done, 1 running, 1 failed, 1 not started)" in text
  lines = [l for l in text.splitlines() if l.startswith("| 0")]
  assert len(lines) == 6  # two methods of the pipeline, one row for each other member
  assert f"| {names[1]} | 0.002 | v | done | ancestral | 8 | 0.4 | 0.97 |" in lines
  assert f"| {names[3]} | 0.002 | eps | failed (exit 1) |  |  |  |  |" in lines
  png = Image.open(tmp_path / "sweep_summary.png")
  assert png.width > 400 and png.height > 200


def test_summary_from_member_directories_alone(tmp_path):
  names = _fake_sweep(tmp_path, with_manifest=False)
  summary = sweep.collect(str(tmp_path), metric="class_acc")
  assert [m["name"] for m in summary["members"]] == names[:4]
  assert summary["members"][1]["overrides"] == {"learning_rate": 0.002, "prediction": "v"}
  assert [m["status"] for m in summary["members"]] == ["done", "done", "running", "running"]
  assert summary["metrics"][0] == "class_acc"


def test_interrupted_when_the_sweep_process_is_gone(tmp_path):
  names = _fake_sweep(tmp_path)
  manifest = json.loads((tmp_path / "sweep.json").read_text())
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  manifest.update(host=sweep.socket.gethostname(), pid=int(proc.stdout))  # a pid that ended
  (tmp_path / "sweep.json").write_text(json.dumps(manifest))
  status = {m["name"]: m["status"] for m in sweep.collect(str(tmp_path))["members"]}
  assert status[names[2]] == "interrupted"


def test_run_records_each_exit_code_and_the_summary_marks_failures(tmp_path, capsys):
  ok = [sys.executable, "-c", "pass"]
  bad = [sys.executable, "-c", "import sys; sys.exit(3)"]
  members = [{"name": "000_lr=1", "overrides": {"lr": 1}, "command": ok},
             {"name": "001_lr=2", "overrides": {"lr": 2}, "command": bad}]
  assert sweep.run_sweep(members, str(tmp_path), config_arg="x.py") == ["001_lr=2"]
  manifest = json.loads((tmp_path / "sweep.json").read_text())
  assert [m["exit_code"] for m in manifest["members"]] == [0, 3]
  text = sweep.summarize(str(tmp_path))
  assert "finished without a final evaluation" in text and "failed (exit 3)" in text
  assert "No plot" in text and not (tmp_path / "sweep_summary.png").exists()


def _cli(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=300)


def test_command_line_summarize_and_its_errors(tmp_path):
  names = _fake_sweep(tmp_path)
  proc = _cli("--summarize", f"--workdir={tmp_path}", "--metric=class_acc")
  assert proc.returncode == 0, proc.stderr
  assert f"| {names[1]} | 0.002 | v | done | ancestral | 8 | 0.97 | 0.4 |" in proc.stdout
  assert "Plot of class_acc" in proc.stdout
  proc = _cli("--summarize", f"--workdir={tmp_path}", "--metric=fdpixels")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "sweep error (SweepError): --metric=fdpixels: no member's final evaluation has it; "
      "choose one of fd_pixels, class_acc.")
  proc = _cli("--summarize", f"--workdir={tmp_path / 'nothing'}")
  assert proc.returncode == 2 and "no sweep members" in proc.stderr
  proc = _cli(f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "--config is required" in proc.stderr


def test_dry_run_still_lists_one_command_per_member(tmp_path):
  proc = _cli(f"--config={helpers.DIGITS}:runlocal", f"--workdir={tmp_path}", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count("-m mmd_jax.main") == 4 and not (tmp_path / "sweep.json").exists()
