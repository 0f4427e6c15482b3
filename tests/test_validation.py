"""The one validation layer for numbers (megavit.config: Bound, bounded, number), property-tested.

Every config value and every typed command-line option goes through the same rule; these tests
draw numbers (finite, NaN, +-inf, at and beside the limits) and compare the verdict with a plain
comparison written out here, so a wrong limit or a lost NaN check fails.
"""

import argparse
import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megavit.config import Bound, ConfigError, bounded, build, load_config, load_mapping, number


@dataclass
class Settings:
    rate: float = bounded(0.5, gt=0, le=1)
    count: int = bounded(1, ge=1)
    scale: float = 2.0  # no declared range: any finite number
    horizon: float = bounded(10.0, gt=0, infinite=True)
    cap: int | None = bounded(None, ge=0)


ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, -0.0, 1e-300])


def expected_rate_ok(value: float) -> bool:
    return not math.isnan(value) and 0 < value <= 1


@settings(max_examples=300, deadline=None)
@given(value=ANY_FLOAT)
def test_a_bounded_float_is_accepted_exactly_in_its_range(value):
    if expected_rate_ok(value):
        assert build(Settings, {"rate": value}).rate == value
    else:
        with pytest.raises(ConfigError) as err:
            build(Settings, {"rate": value})
        assert str(err.value) == f"rate={value!r} is out of range: must be a number in (0, 1]"


@settings(max_examples=200, deadline=None)
@given(value=ANY_FLOAT)
def test_an_unbounded_float_must_still_be_finite(value):
    if math.isfinite(value):
        assert build(Settings, {"scale": value}).scale == value
    else:
        with pytest.raises(ConfigError, match=r"^scale=.* is out of range: must be a finite number$"):
            build(Settings, {"scale": value})


@settings(max_examples=200, deadline=None)
@given(value=ANY_FLOAT)
def test_infinity_passes_only_where_the_field_allows_it(value):
    ok = not math.isnan(value) and value > 0
    if ok:
        assert build(Settings, {"horizon": value}).horizon == value
    else:
        with pytest.raises(ConfigError, match=r"must be a number > 0 or inf$"):
            build(Settings, {"horizon": value})


@settings(max_examples=200, deadline=None)
@given(value=st.integers(min_value=-10**6, max_value=10**6))
def test_integer_limits_and_null(value):
    if value >= 1:
        assert build(Settings, {"count": value}).count == value
    else:
        with pytest.raises(ConfigError, match=rf"^count={value} is out of range: must be an integer >= 1$"):
            build(Settings, {"count": value})
    if value >= 0:
        assert build(Settings, {"cap": value}).cap == value
    else:
        with pytest.raises(ConfigError, match=r"must be an integer >= 0, or null$"):
            build(Settings, {"cap": value})
    assert build(Settings, {"cap": None}).cap is None


@settings(max_examples=300, deadline=None)
@given(value=ANY_FLOAT)
def test_the_command_line_type_applies_the_same_rule_and_words(value):
    parse = number(float, gt=0, le=1)
    text = repr(value)
    if expected_rate_ok(value):
        assert parse(text) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError) as err:
            parse(text)
        assert str(err.value) == f"{text!r} is out of range: must be a number in (0, 1]"


def test_command_line_type_through_argparse_names_the_option(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--dt", type=number(float, gt=0), default=1.0)
    parser.add_argument("--members", type=number(int, ge=1), default=1)
    assert parser.parse_args(["--dt", "0.25", "--members", "3"]) == argparse.Namespace(dt=0.25, members=3)
    for argv, message in ((["--dt", "nan"], "argument --dt: 'nan' is out of range: must be a finite number > 0"),
                          (["--dt=-inf"], "argument --dt: '-inf' is out of range: must be a finite number > 0"),
                          (["--dt", "soon"], "argument --dt: 'soon' is not a number"),
                          (["--members", "0"], "argument --members: '0' is out of range: must be an integer >= 1"),
                          (["--members", "2.5"], "argument --members: '2.5' is not an integer")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"tool: error: {message}"


@pytest.mark.parametrize(("limits", "words"), [
    (dict(gt=0), "a finite number > 0"),
    (dict(ge=0, lt=1), "a number in [0, 1)"),
    (dict(le=5), "a number <= 5"),
    (dict(), "a finite number"),
    (dict(ge=1.5, infinite=True), "a number >= 1.5 or inf"),
])
def test_range_words(limits, words):
    assert Bound(**limits).describe() == words


def test_an_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    with pytest.raises(ConfigError, match=r"config file .*empty.yaml is empty"):
        load_config(Settings, empty)
    assert load_config(Settings, None) == Settings()  # no file at all: the defaults, by choice


def test_a_directory_or_unreadable_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give a YAML file"):
        load_mapping(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rate: [0.5\n")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        load_mapping(broken)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00rate")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        load_mapping(binary)
