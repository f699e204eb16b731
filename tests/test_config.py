"""The typed config loader: YAML + dotted overrides into dataclasses, with errors that name file and field."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from crossdna.config import ConfigError, config_hash, dump_yaml, load, parse_override, read_yaml, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay: list[str] = field(default_factory=lambda: ["bias"])


@dataclass
class Run:
    name: str = "x"
    steps: int = 10
    strategy: Literal["ddp", "fsdp"] = "ddp"
    graph: Literal["auto", "on", "off"] = "auto"
    verbose: bool = False
    resume: Optional[str] = None
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("name: demo\noptim:\n  lr: 3e-4\n  betas: [0.8, 0.95]\n")
    cfg = load(Run, p, ["steps=20", "optim.lr=1e-5", "strategy=fsdp", "resume=null"])
    assert cfg.name == "demo" and cfg.steps == 20 and cfg.strategy == "fsdp" and cfg.resume is None
    assert cfg.optim.lr == pytest.approx(1e-5) and cfg.optim.betas == (0.8, 0.95)
    assert isinstance(cfg.optim.lr, float)


def test_roundtrip_and_hash(tmp_path):
    cfg = load(Run, None, ["optim.lr=0.5"])
    p = tmp_path / "r.yaml"
    p.write_text(dump_yaml(cfg))
    again = load(Run, p)
    assert to_dict(again) == to_dict(cfg)
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load(Run, None, ["optim.lr=0.25"])) != config_hash(cfg)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "optim: unknown field(s) ['lrr']"),
        ("steps=ten", "steps: expected an integer"),
        ("steps=1.5", "steps: expected an integer"),
        ("strategy=zero9", "strategy: 'zero9' is not one of"),
        ("optim.betas=[1,2,3]", "optim.betas: expected 2 items"),
        ("steps=0", "steps must be > 0"),
        ("optim=3", "optim: expected a mapping"),
        ("noequals", "expected key.sub=value"),
    ],
)
def test_errors_name_the_field(tmp_path, override, needle):
    p = tmp_path / "run.yaml"
    p.write_text("name: demo\n")
    with pytest.raises(ConfigError) as e:
        load(Run, p, [override])
    assert needle in str(e.value)
    if "=" in override:
        assert str(p) in str(e.value)


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: demo\noptim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        read_yaml(p)
    with pytest.raises(ConfigError, match="cannot read config"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_yaml(tmp_path / "list.yaml")


def test_scientific_notation_is_float():
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    assert parse_override("a=-2.5E3") == (["a"], -2500.0)
    assert parse_override("a=chr1e5x") == (["a"], "chr1e5x")


def test_only_true_and_false_are_booleans(tmp_path):
    """on/off/yes/no are choices' names, as in YAML 1.2, not the booleans of YAML 1.1."""
    p = tmp_path / "run.yaml"
    p.write_text("graph: off\nverbose: True\n")
    cfg = load(Run, p)
    assert cfg.graph == "off" and cfg.verbose is True
    assert load(Run, p, ["graph=on", "verbose=false"]).graph == "on"
    with pytest.raises(ConfigError, match="verbose: expected true/false, got 'yes'"):
        load(Run, p, ["verbose=yes"])
    assert load(Run, None, [f"graph={dump_yaml(cfg).split('graph: ')[1].split()[0]}"]).graph == "off"


def test_top_level_unknown_field_reads_cleanly(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("nmae: demo\n")
    with pytest.raises(ConfigError) as e:
        load(Run, p)
    assert str(e.value).startswith(f"{p}: unknown field(s) ['nmae']")
