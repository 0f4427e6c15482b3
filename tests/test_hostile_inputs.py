"""Hostile inputs against the DA and data tools, run in-process: each must end in one clear line.

The verdict for every case is the same: a non-zero exit status, no traceback, and a last stderr
line of the form ``PROG: ... error ...`` (argparse: ``PROG: error: argument ...``) that contains
the phrase naming the cause (the option or key, the value, the file). The cases are the table
of docs/errors.md, section "Data assimilation and data tools"; the count per tool is printed
there. The multi-rank faults (a dead or stopped rank, SIGTERM under mpiexec, SIGKILL and resume)
have their own tests in test_scale.py, test_preprocessing.py, test_restart.py and test_atomic.py.
"""

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from da_plugin import cycle
from da_plugin.models import sqg_truth
from da_plugin.scale import problem_gen
from da_plugin.scale import run as scale_run
from megavit.data import preprocess, split_runs

ROOT = Path(__file__).resolve().parent.parent
L96 = str(ROOT / "configs/da/l96_letkf.yaml")
SCALE = str(ROOT / "configs/da/l96_ensf_scale.yaml")
TINY_CYCLE = ["cycles=2", "burn_in=0", "model.dim=40", "progress=false"]


def files(tmp: Path) -> dict[str, str]:
    """Damaged or wrong inputs, made fresh for each case."""
    (tmp / "empty.yaml").write_text("")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "broken.yaml").write_text("filter: [ensf\n")
    (tmp / "binary.yaml").write_bytes(b"\x00\xff\xfe")
    (tmp / "a_dir").mkdir()
    (tmp / "not_a_dir").write_text("")
    (tmp / "garbage.nc").write_bytes(b"not a netCDF file" * 10)
    (tmp / "meta_list").mkdir()
    (tmp / "meta_list" / "meta.json").write_text("[1, 2]")
    names = dict(empty="empty.yaml", list_yaml="list.yaml", broken="broken.yaml", binary="binary.yaml", a_dir="a_dir",
                 not_a_dir="not_a_dir", garbage="garbage.nc", meta_list="meta_list")
    return {key: str(tmp / name) for key, name in names.items()}


CASES = {  # tool: [(argv with {file} placeholders, phrase the last line must contain), ...]
    "da-cycle": [
        (["{empty}"], "is empty"),
        (["{a_dir}"], "is a directory; give a YAML file"),
        (["{broken}"], "cannot parse config file"),
        (["{binary}"], "cannot parse config file"),
        (["{list_yaml}"], "must hold a mapping at the top level"),
        (["nowhere.yaml"], "config file not found: nowhere.yaml"),
        ([L96, "obs.sigma=.nan"], "obs.sigma=nan is out of range: must be a finite number > 0"),
        ([L96, "obs.sigma=-1"], "obs.sigma=-1.0 is out of range"),
        ([L96, "obs.stride=0"], "obs.stride=0 is out of range: must be an integer >= 1"),
        ([L96, "obs.random_fraction=1.5"], "obs.random_fraction=1.5 is out of range: must be a number in (0, 1]"),
        ([L96, "filter.ensemble_size=1"], "filter.ensemble_size must be >= 2, got 1"),
        ([L96, "filter.ensmble_size=4"], "unknown config key 'filter.ensmble_size'; did you mean ensemble_size"),
        ([L96, "filter.name=enfs"], "did you mean ensf"),
        ([L96, "cycles=ten"], "cycles: expected int, found 'ten'"),
        ([L96, "obs.operator=square"], "obs.operator: 'square' is not one of"),
        ([L96, "obs.sigma"], "is not of the form key=value"),
        ([L96, "output_dir={not_a_dir}/run", *TINY_CYCLE], "not_a_dir"),
        ([L96, "device=gpu0", *TINY_CYCLE], "device=gpu0: "),
        ([L96, "threads=-1"], "threads=-1 is out of range: must be an integer >= 0"),
        ([L96, "filter.backend=cpp"], "needs filter.solver=newton"),
        ([L96, "filter.backend=gpu"], "filter.backend: 'gpu' is not one of"),
        ([str(ROOT / "configs/da/sqg_letkf.yaml"), "model.tdiab=.nan"], "model.tdiab=nan is out of range: must be a "
                                                                         "number > 0 or inf"),
    ],
    "da_plugin.scale": [
        ([SCALE, "model.dim=1000", "cycles=0"], "cycles=0 is out of range: must be an integer >= 1"),
        ([SCALE, "timeout_s=-5"], "timeout_s=-5.0 is out of range: must be a finite number > 0"),
        ([SCALE, "timeout_s=.inf"], "timeout_s=inf is out of range: must be a finite number > 0"),
        ([SCALE, "init_spread=.nan"], "init_spread=nan is out of range"),
        ([SCALE, "forecast_chunk=0"], "forecast_chunk=0 is out of range"),
        ([SCALE, "filter.steps=0"], "filter.steps=0 is out of range"),
        ([SCALE, "filter.eps_alpha=1"], "filter.eps_alpha=1.0 is out of range: must be a number in (0, 1)"),
        ([SCALE, "obs.random_fraction=0.5"], "obs.random_fraction is not available to the decomposed run"),
        ([SCALE, "{empty}"], "is not of the form key=value"),
        (["{empty}"], "is empty"),
        ([SCALE, "model.dim=1000", "cycles=1", "device=cpu", "problem_dir={a_dir}"], "no meta.json"),
        ([SCALE, "model.dim=1000", "cycles=1", "device=cpu", "output_dir={not_a_dir}/run"],
         "not_a_dir is not a directory"),
    ],
    "ensf_problem_gen": [
        (["--dim", "100", "--steps", "2", "--forcing", "nan", "--out", "{a_dir}/p"], "--forcing: 'nan' is out of"),
        (["--dim", "100", "--steps", "2", "--dt", "inf", "--out", "{a_dir}/p"],
         "--dt: 'inf' is out of range: must be a finite number > 0"),
        (["--dim", "100", "--steps", "2", "--dt=-0.1", "--out", "{a_dir}/p"], "--dt: '-0.1' is out of range"),
        (["--dim", "3", "--steps", "2", "--out", "{a_dir}/p"], "--dim: '3' is out of range: must be an integer >= 4"),
        (["--dim", "100", "--steps", "0", "--out", "{a_dir}/p"], "--steps: '0' is out of range"),
        (["--dim", "100", "--steps", "2", "--obs-sigma", "0", "--out", "{a_dir}/p"], "--obs-sigma: '0' is out of"),
        (["--dim", "100", "--steps", "2", "--obs-stride", "0", "--out", "{a_dir}/p"], "--obs-stride: '0' is out of"),
        (["--dim", "100", "--steps", "2", "--timeout-s=-1", "--out", "{a_dir}/p"], "--timeout-s: '-1' is out of"),
        (["--dim", "many", "--steps", "2", "--out", "{a_dir}/p"], "--dim: 'many' is not an integer"),
        (["--dim", "100", "--steps", "2", "--out", "{not_a_dir}"], "not_a_dir exists and is not a directory"),
        (["--dim", "100", "--steps", "2", "--out", "{not_a_dir}/p"], "not_a_dir"),
    ],
    "sqg_generate": [
        (["--days", "nan", "--out", "{a_dir}/r.nc"], "--days"),
        (["--days", "-1", "--out", "{a_dir}/r.nc"], "--days"),
        (["--dt", "0", "--out", "{a_dir}/r.nc"], "--dt: '0' is out of range"),
        (["--members", "0", "--out", "{a_dir}/r.nc"], "--members"),
        (["--output-interval-hours", "inf", "--out", "{a_dir}/r.nc"], "--output-interval-hours"),
        (["--diagnose", "{garbage}"], "garbage.nc"),
        (["--diagnose", "nowhere.nc"], "nowhere.nc"),
        (["--resume", "--out", "{garbage}"], "garbage.nc"),
    ],
    "nc2npy_mpi": [
        (["--input", "x.nc", "--out-dir", "o", "--start_train_day", "nan", "--start_val_day", "1",
          "--start_test_day", "2", "--end_day", "3", "--num_shards", "1"], "--start_train_day"),
        (["--input", "x.nc", "--out-dir", "o", "--start_train_day", "0", "--start_val_day", "1",
          "--start_test_day", "2", "--end_day", "3", "--num_shards", "0"], "--num_shards: '0' is out of range"),
        (["--input", "x.nc", "--out-dir", "o", "--start_train_day", "0", "--start_val_day", "1",
          "--start_test_day", "2", "--end_day", "3", "--num_shards", "1", "--block-mb", "inf"], "--block-mb"),
        (["--input", "x.nc", "--out-dir", "o", "--start_train_day", "0", "--start_val_day", "1",
          "--start_test_day", "2", "--end_day", "3", "--num_shards", "1", "--timeout-s", "0"], "--timeout-s"),
    ],
    "sqg_split_mpi": [
        (["--input", "x.nc", "--out-dir", "o", "--length-days", "-2"], "--length-days"),
        (["--input", "x.nc", "--out-dir", "o", "--steps-per-file", "0"], "--steps-per-file"),
        (["--input", "x.nc", "--out-dir", "o", "--length-days", "inf"], "--length-days"),
    ],
}
PARSERS_ONLY = {"nc2npy_mpi": preprocess.parse_args, "sqg_split_mpi": split_runs.parse_args}
MAINS = {"da-cycle": cycle.main, "da_plugin.scale": scale_run.main, "ensf_problem_gen": problem_gen.main,
         "sqg_generate": sqg_truth.main}


def outcome(tool: str, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of the tool's main (or, for the MPI tools, its argument parser) in-process."""
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            if tool in PARSERS_ONLY:
                PARSERS_ONLY[tool](argv)
                status = 0
            else:
                status = MAINS[tool](argv)
        except SystemExit as stop:
            status = stop.code
    return status, stderr.getvalue()


@pytest.mark.parametrize(("tool", "argv", "phrase"),
                         [(tool, argv, phrase) for tool, cases in CASES.items() for argv, phrase in cases],
                         ids=[f"{tool}:{' '.join(argv)[-60:]}" for tool, cases in CASES.items() for argv, _ in cases])
def test_a_hostile_input_ends_in_one_clear_line(tmp_path, tool, argv, phrase):
    paths = files(tmp_path)
    status, err = outcome(tool, [arg.format(**paths) for arg in argv])
    lines = [line for line in err.splitlines() if line.strip()]
    assert status not in (0, None), err
    assert "Traceback" not in err, err
    assert lines and "error" in lines[-1] and phrase in lines[-1], err


def test_problem_meta_of_the_wrong_shape_is_named(tmp_path):
    """A problem directory whose meta.json is valid JSON of the wrong shape (a list, not the fields)."""
    paths = files(tmp_path)
    status, err = outcome("da_plugin.scale", [SCALE, "model.dim=1000", "cycles=1", "device=cpu",
                                              f"problem_dir={paths['meta_list']}", f"output_dir={tmp_path}/o"])
    assert status == 1 and "Traceback" not in err and "meta.json" in err.splitlines()[-1], err


def test_a_truncated_restart_file_is_named(tmp_path):
    """resume=true with a restart file cut short: one line naming it, and nothing published."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "restart.pt").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    status, err = outcome("da-cycle", [L96, *TINY_CYCLE, f"output_dir={out}", "resume=true"])
    assert status == 1 and "Traceback" not in err and "restart.pt" in err.splitlines()[-1], err
    assert sorted(p.name for p in out.iterdir()) == ["restart.pt"]


def test_infinity_stays_allowed_where_the_model_means_none():
    """SQG's diffusion and relaxation times take inf (no diffusion, no relaxation), as sqgturb's do."""
    from da_plugin.cycle import CycleConfig
    from megavit.config import load_config

    config = load_config(CycleConfig, ROOT / "configs/da/sqg_letkf.yaml", ["model.tdiab=.inf", "model.diff_efold=.inf"])
    assert config.model.tdiab == float("inf") and config.model.diff_efold == float("inf")
