"""plot-results: the table equals summary.json, the spectrum matches analytic modes, figures and errors."""

import json
from pathlib import Path

import matplotlib.image
import netCDF4
import numpy as np
import pytest

from da_plugin.cycle import CycleConfig, run
from da_plugin.io import FIELD_SHAPE_ATTRIBUTE
from da_plugin.models.sqg import SQG
from da_plugin.plot_results import field_spectra, load_run, main, read_fields
from da_plugin.plotting import isotropic_spectrum
from megavit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["cycles=6", "burn_in=2", "spinup_steps=50", "model.dim=40", "filter.ensemble_size=6", "progress=false"]
GRID = (2, 16, 16)  # levels, ny, nx
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def l96_runs(tmp_path_factory) -> list[Path]:
    """Two real da-cycle runs on a tiny Lorenz-96: EnSF with a free run, LETKF without."""
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, extra in (("ensf", []), ("letkf", ["free_run=false"])):
        overrides = [*TINY, f"output_dir={root / name}", *extra]
        run(load_config(CycleConfig, ROOT / f"configs/da/l96_{name}.yaml", overrides))
        runs.append(root / name)
    return runs


@pytest.fixture(scope="module")
def sqg_run(tmp_path_factory) -> Path:
    """A real da-cycle run on a 16 x 16 SQG grid: fields stored flat with the field_shape attribute."""
    out = tmp_path_factory.mktemp("sqg") / "letkf"
    overrides = ["cycles=2", "burn_in=0", "spinup_steps=10", "model.name=sqg", "model.N=16", "obs.operator=identity",
                 "obs.interval=7200", "filter.name=letkf", "filter.ensemble_size=4", "progress=false",
                 f"output_dir={out}"]
    run(load_config(CycleConfig, None, overrides))
    return out


def mode(amplitude: float, kx: int, ky: int, n: int = GRID[-1]) -> np.ndarray:
    """amplitude * cos(2 pi (kx x + ky y) / n) on an n x n grid, [y, x]."""
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return amplitude * np.cos(2 * np.pi * (kx * x + ky * y) / n)


def make_grid_run(path: Path, flat: bool, cycles: int = 3) -> np.ndarray:
    """A run folder with SQG-like fields [time, level, y, x] (stored flat with the shape attribute,
    or 4-D), 12-h cycles in seconds, and a summary; returns the truth."""
    path.mkdir()
    truth = np.stack([np.stack([mode(3.0, 3, 4) + t, mode(2.0, 1, 0) - t]) for t in range(cycles)])
    analysis = truth + 0.1
    (path / "summary.json").write_text(json.dumps({"rmse_a": 0.1, "spread_a": 0.2, "rmse_free": 5.0,
                                                   "burn_in": 1, "model": "SQG", "filter": "EnSF"}))
    with netCDF4.Dataset(path / "analysis.nc", "w") as ds:
        ds.createDimension("time", None)
        time = ds.createVariable("time", "f8", ("time",))
        time.units = "seconds"
        time[:] = 43200.0 * np.arange(1, cycles + 1)
        for name, value in (("rmse_a", 0.1), ("spread_a", 0.2), ("rmse_free", 5.0)):
            ds.createVariable(name, "f8", ("time",))[:] = np.full(cycles, value)
            ds[name].units = "K"
        if flat:
            ds.createDimension("x", np.prod(GRID))
            ds.setncattr(FIELD_SHAPE_ATTRIBUTE, np.array(GRID, dtype="i4"))
            dims, store = ("time", "x"), lambda field: field.reshape(cycles, -1)
        else:
            for name, size in zip(("level", "y", "x"), GRID, strict=True):
                ds.createDimension(name, size)
            dims, store = ("time", "level", "y", "x"), lambda field: field
        for name, field in (("truth", truth), ("analysis_mean", analysis)):
            ds.createVariable(name, "f4", dims)[:] = store(field)
    return truth


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The markdown table as {run label: {column: cell}}."""
    lines = [line.strip("|").split("|") for line in text.strip().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells), strict=True)) for cells in lines[2:]}


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3


def test_table_equals_summary_and_figures_written(l96_runs, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main([*map(str, l96_runs), "--out", str(out), "--labels", "EnSF,LETKF"]) == 0
    captured = capsys.readouterr()
    rows = table_rows((out / "summary.md").read_text())
    assert rows == table_rows(captured.out)
    for label, path in zip(("EnSF", "LETKF"), l96_runs, strict=True):
        summary = json.loads((path / "summary.json").read_text())
        row = rows[label]
        assert (row["filter"], row["model"], row["burn-in"], row["cycles"]) == (label, "Lorenz96", "2", "6")
        for name in ("rmse_a", "spread_a", "rmse_free"):
            if name in summary:
                assert float(row[name]) == pytest.approx(summary[name], rel=1e-3)
    assert rows["LETKF"]["rmse_free"] == "n/a"
    assert sorted(p.name for p in out.iterdir()) == ["rmse_spread.png", "summary.md"]  # no maps, no temporaries
    assert_png(out / "rmse_spread.png")
    assert captured.err.count("no maps or spectra") == 2 and "1-D state of 40 variables" in captured.err


def test_burn_in_recomputes_the_same_means(l96_runs, tmp_path, capsys):
    """--burn-in equal to the run's burn_in recomputes summary.json's numbers from analysis.nc."""
    assert main([str(l96_runs[0]), "--out", str(tmp_path), "--burn-in", "2"]) == 0
    row = table_rows(capsys.readouterr().out)["ensf"]
    summary = json.loads((l96_runs[0] / "summary.json").read_text())
    for name in ("rmse_a", "spread_a", "rmse_free"):
        assert float(row[name]) == pytest.approx(summary[name], rel=1e-3)


@pytest.mark.parametrize("kx, ky, amplitude", [(3, 4, 3.0), (0, 7, 0.5), (5, 5, 2.0)])
def test_spectrum_of_a_single_mode(kx, ky, amplitude):
    """A cos(k.x) puts its variance A^2/2 in the shell round(|k|) and nothing elsewhere; a constant c puts c^2 at 0."""
    k, spectrum = isotropic_spectrum(mode(amplitude, kx, ky) + 1.5)
    expected = np.zeros_like(spectrum)
    expected[round(np.hypot(kx, ky))] = amplitude**2 / 2
    expected[0] = 1.5**2
    np.testing.assert_allclose(spectrum, expected, atol=1e-12)
    assert k[np.argmax(spectrum[1:]) + 1] == round(np.hypot(kx, ky))


def test_kinetic_energy_spectrum_of_a_lower_lid_mode():
    """theta = A cos(K.x) on the lower lid only: psi(z) = -A cosh(mu (H - z)/H) H / (s mu sinh mu) (from
    d(psi)/dz = theta / s on the lids, mu = |K| N H / f), and a mode's mean KE is |K|^2 |psi|^2 / 4."""
    model, amplitude = SQG(N=GRID[-1]), 2.0
    truth = np.stack([mode(amplitude, 3, 4), np.zeros(GRID[1:])])
    k, spectra, label = field_spectra(truth, truth, model, "K")
    wave = 2 * np.pi * 5 / model.L
    mu = wave * np.sqrt(model.nsq) * model.H / model.f
    psi = amplitude * model.H / (model.f * model.theta0 / model.g * mu * np.sinh(mu)) * np.array([np.cosh(mu), 1.0])
    expected = np.zeros((2, len(k)))
    expected[:, k == 5] = (wave**2 * psi**2 / 4)[:, None]
    np.testing.assert_allclose(spectra["truth"], expected, rtol=1e-10, atol=1e-12)
    assert not spectra["analysis - truth"].any() and label.startswith("kinetic energy")
    assert k[0] == 1 and k[-1] == GRID[-1] // 2


def test_spectrum_batched_and_parseval():
    fields = np.random.default_rng(0).normal(size=(2, 3, 12, 20))
    k, spectrum = isotropic_spectrum(fields)
    assert spectrum.shape == (2, 3, len(k))
    np.testing.assert_allclose(spectrum.sum(-1), (fields**2).mean((-2, -1)))
    np.testing.assert_allclose(spectrum[1, 2], isotropic_spectrum(fields[1, 2])[1])


@pytest.mark.parametrize("flat", [True, False], ids=["flat+field_shape", "level-y-x"])
def test_grid_run_maps_and_spectra(tmp_path, capsys, flat):
    truth = make_grid_run(tmp_path / "sqg", flat)
    run_ = load_run(tmp_path / "sqg", "sqg")
    assert run_.grid == GRID and run_.units == "K" and run_.time_units == "days"
    np.testing.assert_allclose(run_.time, [0.5, 1.0, 1.5])
    np.testing.assert_allclose(read_fields(run_, 1)[0], truth[1], rtol=1e-6)
    out = tmp_path / "figs"
    assert main([str(tmp_path / "sqg"), "--out", str(out), "--cycle", "1"]) == 0
    for name in ("rmse_spread.png", "maps_sqg.png", "spectra_sqg.png"):
        assert_png(out / name)
    assert "no maps" not in capsys.readouterr().err


def test_da_cycle_sqg_run_gets_maps_in_kelvin_and_days(sqg_run, tmp_path, capsys):
    run_ = load_run(sqg_run, "sqg")
    assert run_.grid == (2, 16, 16) and run_.units == "K" and run_.time_units == "days"
    assert run_.sqg == SQG(N=16)  # kinetic-energy spectra
    np.testing.assert_allclose(run_.time, [1 / 12, 2 / 12])  # two 2-hour cycles
    with netCDF4.Dataset(sqg_run / "analysis.nc") as ds:
        np.testing.assert_array_equal(read_fields(run_, -1)[0], ds["truth"][1].reshape(2, 16, 16))
    assert main([str(sqg_run), "--out", str(tmp_path)]) == 0
    assert float(table_rows(capsys.readouterr().out)["letkf"]["rmse_a"]) == pytest.approx(
        json.loads((sqg_run / "summary.json").read_text())["rmse_a"], rel=1e-3)
    for name in ("rmse_spread.png", "maps_letkf.png", "spectra_letkf.png"):
        assert_png(tmp_path / name)


def write_garbage(path: Path) -> None:
    (path / "analysis.nc").write_bytes(b"not netCDF")


def drop_summary(path: Path) -> None:
    (path / "summary.json").unlink()


def bad_field_shape(path: Path) -> None:
    with netCDF4.Dataset(path / "analysis.nc", "a") as ds:
        ds.setncattr(FIELD_SHAPE_ATTRIBUTE, "2 16 15")


def other_sqg_grid(path: Path) -> None:
    (path / "config.yaml").write_text("model: {name: sqg, N: 32}\n")


@pytest.mark.parametrize(
    "damage, args, code, message",
    [
        (drop_summary, [], 1, "plot-results: error: {run} has no summary.json"),
        (write_garbage, [], 1, "plot-results: error: {run}/analysis.nc is not a readable netCDF file"),
        (bad_field_shape, [], 1, "field_shape='2 16 15' does not hold the 512 state variables"),
        (other_sqg_grid, [], 1, "config.yaml's SQG grid (2, 32, 32) differs from the stored fields' (2, 16, 16)"),
        (None, ["--cycle", "3"], 1, "--cycle 3 is outside {run}'s cycles 0..2"),
        (None, ["--burn-in", "3"], 1, "--burn-in 3 leaves nothing of {run}'s 3 cycles"),
        (None, ["--labels", "a,b"], 2, "plot-results: error: --labels has 2 names for 1 run folders"),
        (None, ["--burn-in", "-1"], 2, "--burn-in must be >= 0"),
        (None, ["{run}"], 2, "run labels must differ"),  # the same folder name twice
    ],
)
def test_errors(tmp_path, capsys, damage, args, code, message):
    run_dir = tmp_path / "sqg"
    make_grid_run(run_dir, flat=True)
    if damage:
        damage(run_dir)
    out = tmp_path / "figs"
    try:
        result = main([*(arg.format(run=run_dir) for arg in args), str(run_dir), "--out", str(out)])
    except SystemExit as exit_:  # argparse's usage errors
        result = exit_.code
    assert result == code
    assert message.format(run=run_dir) in capsys.readouterr().err
    assert not out.exists()  # checked before anything is written


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "example:\n  plot-results " in capsys.readouterr().out
