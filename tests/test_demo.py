"""`make demo` end to end at toy size: the real commands (sqg-generate, nc2npy under mpiexec,
the deepspeed launcher, convert-checkpoint, evaluate-surrogate, da-cycle, plot-results) chained by
the Makefile's own rules, then a second `make demo` that finds everything up to date."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"sqg_vit_ensf": ("ViTSurrogate", "EnSF"), "sqg_ensf": ("SQG", "EnSF"), "sqg_letkf": ("SQG", "LETKF"),
        "sqg_free_vit": ("ViTSurrogate", "EnSF"), "sqg_free": ("SQG", "EnSF")}


def toy(demo: Path) -> list[str]:
    return [f"DEMO={demo}", "DEMO_SPINUP_DAYS=2", "DEMO_DAYS=14",
            "DEMO_SPLIT=--start_train_day 2 --start_val_day 8 --start_test_day 12 --end_day 16",
            "DEMO_TRAIN=train.steps=4 train.eval_every=0 train.save_every=0 model.num_layers=2 model.embed_dim=64",
            "DEMO_SKILL_STARTS=2", "DEMO_START_DAY=12.5", "DEMO_CYCLES=3"]


def test_make_demo_runs_the_whole_story_at_toy_size(tmp_path):
    demo = tmp_path / "demo"
    env = dict(os.environ, MASTER_PORT="29731")
    result = subprocess.run(["make", "-C", str(ROOT), "demo", *toy(demo)], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    layout = json.loads((demo / "vit/checkpoints/step0000004/layout.json").read_text())
    assert (layout["tp"], layout["dp"]) == (2, 1)  # the deepspeed launcher's 2 ranks, tensor-parallel
    metadata = json.loads((demo / "vit/consolidated/megavit.json").read_text())
    assert metadata["source"]["tp"] == 2 and metadata["data"]["lead_hours"] == 12.0
    for run, (model, da_filter) in RUNS.items():
        summary = json.loads((demo / "da" / run / "summary.json").read_text())
        assert (summary["model"], summary["filter"], summary["cycles"]) == (model, da_filter, 3), run
    table = (demo / "figures/summary.md").read_text()
    for label in ("EnSF+ViT", "EnSF+SQG", "LETKF+SQG", "free ViT", "free SQG"):
        assert f"| {label} |" in table
    assert (demo / "figures/rmse_spread.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ViT surrogate |" in result.stdout and "| persistence |" in result.stdout  # the skill table printed
    # every step is skipped when its output exists
    again = subprocess.run(["make", "-C", str(ROOT), "--question", str(demo / "figures/summary.md"), *toy(demo)],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
