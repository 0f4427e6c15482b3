"""da-cycle on a small two-level SQG grid: truth and forecast models apart, a nature run from a
file, shocks from the seed, 2-D observation subsets, and the interval checks."""

import dataclasses
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import torch

from da_plugin.cycle import CycleConfig, ShockConfig, make_generator, model_error_note, run, shock_schedule
from da_plugin.models.sqg import SQG
from da_plugin.obs import ObsConfig, ObservationOperator
from megavit.config import ConfigError, load_config
from megavit.data.sqg_netcdf import RunWriter, create_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["cycles=4", "burn_in=0", "spinup_steps=60", "model.N=16", "filter.ensemble_size=6",
         "filter.localization_radius=2.0", "progress=false", "restart_every=0"]


def cycle(tmp_path: Path, *overrides: str, name: str = "out") -> tuple[CycleConfig, dict, Path]:
    config = load_config(CycleConfig, ROOT / "configs/da/sqg_letkf.yaml",
                         [*SMALL, f"output_dir={tmp_path / name}", *overrides])
    return config, run(config), tmp_path / name


def fields(out: Path, name: str) -> np.ndarray:
    with netCDF4.Dataset(out / "analysis.nc") as ds:
        return np.asarray(ds[name][:]).reshape(len(ds["time"]), *ds.field_shape) if name != "shock" else \
            np.asarray(ds[name][:])


def test_sqg_outputs_grid_units_and_scores(tmp_path):
    config, summary, out = cycle(tmp_path)
    with netCDF4.Dataset(out / "analysis.nc") as ds:
        assert list(ds.field_shape) == [2, 16, 16] and ds["rmse_a"].units == "K" and ds["time"].units == "seconds"
        np.testing.assert_allclose(ds["time"][:], 43200.0 * np.arange(1, 5))
        truth, mean = fields(out, "truth"), fields(out, "analysis_mean")
        np.testing.assert_allclose(ds["rmse_a"][:], np.sqrt(((mean - truth) ** 2).mean((1, 2, 3))), rtol=1e-4)
    assert config.nature_steps == config.forecast_steps == 36
    assert summary["rmse_a"] < summary["rmse_f"] and summary["rmse_a"] < summary["rmse_free"]


def test_truth_model_differs_from_forecast_model(tmp_path):
    """The stored truth is an independent integration of the truth model's own parameters."""
    config, _, out = cycle(tmp_path, "truth.model.name=sqg", "truth.model.N=16", "truth.model.U=20.0",
                           "cycles=2", "free_run=false")
    assert config.truth.model.U == 20.0 and config.model.U == 30.0
    truth_model = SQG(N=16, U=20.0)
    state = truth_model.initial_state(make_generator(config.seed, "truth"))
    state = truth_model.step(state, 60)
    expected = [state := truth_model.step(state, 36) for _ in range(2)]
    np.testing.assert_allclose(fields(out, "truth"), torch.stack(expected).numpy(), atol=1e-4)


def test_perfect_model_twin_resolves_truth_model(tmp_path):
    config = load_config(CycleConfig, ROOT / "configs/da/sqg_letkf.yaml", SMALL)
    assert config.truth.model is config.model


def write_run_file(path: Path, model: SQG, frames: np.ndarray, spacing: float) -> None:
    attributes = {k: int(v) if isinstance(v, bool) else v for k, v in dataclasses.asdict(model).items()}
    create_run(path, n=model.N, length=model.L, height=model.H, title="test run", creator="test",
               attributes=attributes)
    with RunWriter(path) as writer:
        for index, frame in enumerate(frames):
            writer.write(index, frame, index * spacing)


def test_truth_from_a_run_file(tmp_path):
    model = SQG(N=16)
    frames = np.random.default_rng(0).normal(size=(9, 2, 16, 16)).astype(np.float32)
    write_run_file(tmp_path / "run.nc", model, frames, spacing=21600.0)  # 6-hourly frames
    _, _, out = cycle(tmp_path, "truth.source=file", f"truth.path={tmp_path / 'run.nc'}", "truth.start_day=0.5",
                      "cycles=3", "free_run=false")
    # start at day 0.5 (frame 2), analyses every 12 h: frames 4, 6, 8
    np.testing.assert_array_equal(fields(out, "truth"), frames[[4, 6, 8]])
    with pytest.raises(ConfigError, match="no frame at day 3"):
        cycle(tmp_path, "truth.source=file", f"truth.path={tmp_path / 'run.nc'}", "cycles=6", name="long")


def test_interval_must_be_whole_model_steps(tmp_path):
    with pytest.raises(ConfigError, match="interval 1000 is not a whole number of its time steps dt=1200"):
        cycle(tmp_path, "obs.interval=1000.0")
    with pytest.raises(ConfigError, match=r"states \[40\] differ from the forecast model.s \[2, 16, 16\]"):
        cycle(tmp_path, "truth.model.name=lorenz96")


def test_shock_schedule_follows_the_published_bins_and_the_seed():
    config = ShockConfig(mode="observed")
    first = shock_schedule(config, 4000, 2.0, make_generator(3, "shock-cycles"))
    again = shock_schedule(config, 4000, 2.0, make_generator(3, "shock-cycles"))
    other = shock_schedule(config, 4000, 2.0, make_generator(4, "shock-cycles"))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first[0] == 0
    # independent recomputation from the same uniforms, as the SC24 code bins them
    u = torch.rand(4000, generator=make_generator(3, "shock-cycles"), dtype=torch.float64).numpy()
    expected = np.select([u > 0.95, u > 0.85, u > 0.7, u > 0.5], [1500.0, 1200.0, 900.0, 600.0], 0.0) * 2.0
    expected[0] = 0.0
    np.testing.assert_array_equal(first, expected)
    assert abs((first > 0).mean() - 0.5) < 0.03
    assert not shock_schedule(ShockConfig(), 50, 2.0, make_generator(3, "shock-cycles")).any()


def test_observed_shocks_leave_the_nature_run_alone(tmp_path):
    _, _, calm = cycle(tmp_path, "cycles=8", "free_run=false", name="calm")
    config, _, shocked = cycle(tmp_path, "cycles=8", "free_run=false", "shocks.mode=observed", name="shocked")
    amplitude = fields(shocked, "shock")
    assert (amplitude > 0).any() and (amplitude == 0).any()
    assert set(np.round(amplitude[amplitude > 0] / config.truth.model.scale)) <= {1500, 1200, 900, 600}
    difference = fields(shocked, "truth") - fields(calm, "truth")
    for k, a in enumerate(amplitude):  # the stored truth is the nature run plus this cycle's shock only
        assert difference[k].std() == pytest.approx(a, rel=0.15, abs=1e-6)


def test_nature_shocks_move_the_nature_run(tmp_path):
    _, _, calm = cycle(tmp_path, "cycles=6", "free_run=false", "seed=3", name="calm")
    _, _, jumped = cycle(tmp_path, "cycles=6", "free_run=false", "seed=3", "shocks.mode=nature", name="jumped")
    amplitude = fields(jumped, "shock")
    first = int(np.flatnonzero(amplitude)[0])
    difference = np.abs(fields(jumped, "truth") - fields(calm, "truth")).reshape(6, -1).max(1)
    assert (difference[:first] < 1e-5).all() and (difference[first:] > 0.1).all()


def test_two_dimensional_observation_stride():
    obs = ObservationOperator.from_config(ObsConfig(stride=2), (2, 8, 8), torch.Generator())
    expected = [level * 64 + y * 8 + x for level in range(2) for y in range(0, 8, 2) for x in range(0, 8, 2)]
    assert obs.indices.tolist() == expected


def test_assimilate_cycles_one_is_a_free_run_after_one_analysis(tmp_path):
    _, summary, out = cycle(tmp_path, "assimilate_cycles=1", "cycles=3")
    with netCDF4.Dataset(out / "analysis.nc") as ds:
        rmse_f, rmse_a = ds["rmse_f"][:], ds["rmse_a"][:]
    assert rmse_a[0] < rmse_f[0]
    np.testing.assert_array_equal(rmse_a[1:], rmse_f[1:])


def test_a_truth_model_unlike_the_forecast_model_is_named():
    same = load_config(CycleConfig, ROOT / "configs/da/sqg_letkf.yaml", SMALL)
    assert model_error_note(same) is None  # a perfect-model twin
    differ = load_config(CycleConfig, ROOT / "configs/da/sqg_letkf.yaml",
                         [*SMALL, "truth.model.name=sqg", "truth.model.N=16", "truth.model.sqgturb_compat=true"])
    assert model_error_note(differ) == ("the nature run's SQG and the forecast model differ (sqgturb_compat=True vs "
                                        "False; truth first): a model-error experiment")
