"""The YAML + dotted-override config loader."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from megavit.config import ConfigError, build, load_config, registry_field, to_dict


@dataclass
class Alpha:
    size: int = 2
    rate: float = 0.5


@dataclass
class Beta:
    depth: int = 3


@dataclass
class Inner:
    kind: Literal["fast", "slow"] = "fast"
    limit: float | None = None


@dataclass
class Outer:
    seed: int = 0
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    part: object = registry_field({"alpha": Alpha, "beta": Beta}, "alpha")

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ninner:\n  kind: slow\npart:\n  name: beta\n  depth: 5\n")
    config = load_config(Outer, path, ["inner.limit=2", "part.depth=7"])
    assert config.seed == 3 and config.inner.kind == "slow" and config.inner.limit == 2.0
    assert isinstance(config.part, Beta) and config.part.depth == 7
    assert to_dict(config)["part"] == {"name": "beta", "depth": 7}
    assert build(Outer, to_dict(config)) == config  # the saved config rebuilds the same run


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sed=1"], r"unknown config key 'sed'; did you mean seed"),
        (["inner.limt=1"], r"unknown config key 'inner.limt'; did you mean limit"),
        (["part.sise=1"], r"unknown config key 'part.sise'; did you mean size"),
        (["inner.kind=fsat"], r"inner.kind: 'fsat' is not one of \['fast', 'slow'\]; did you mean fast"),
        (["part.name=alfa"], r"part.name: unknown value 'alfa'.*did you mean alpha"),
        (["seed=abc"], r"seed: expected int, found 'abc'"),
        (["seed=2.5"], r"seed: expected int, found 2.5"),
        (["seed=-1"], r"seed must be >= 0, got -1"),
        (["seed"], r"not of the form key=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        load_config(Outer, "/no/such.yaml")


def test_a_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- seed: 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_config(Outer, path)


def test_integral_floats_are_accepted_for_integer_keys():
    # what model.dim=1e7 means on the command line; 2.5 is refused above
    assert load_config(Outer, None, ["seed=1e7", "part.size=2.0"]).seed == 10_000_000
    assert load_config(Outer, None, ["part.size=2.0"]).part.size == 2
