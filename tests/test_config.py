from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from fmct_ray import config as C
from fmct_ray.downstream.config import FinetuneConfig
from fmct_ray.downstream.suite import SuiteConfig
from fmct_ray.eval.labels import LabelConfig
from fmct_ray.ingest.pipeline import IngestConfig
from fmct_ray.sites import SitesConfig
from fmct_ray.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]

# Root config class of each folder under configs/: every YAML there must load and validate.
CONFIG_KINDS = {
    "ingest": IngestConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "labels": LabelConfig,
    "sites": SitesConfig,
    "suite": SuiteConfig,
}


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    name: Literal["adamw", "sgd"] = "adamw"


@dataclass(frozen=True)
class Root:
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    tag: str | None = None
    sizes: tuple[int, ...] = (1, 2)


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim:\n  lr: 3e-4\nsteps: 5\n")
    cfg = C.load(Root, f, ["optim.betas=[0.8, 0.99]", "tag=run1", "sizes=[3]"])
    assert cfg == Root(optim=Optim(lr=3e-4, betas=(0.8, 0.99)), steps=5, tag="run1", sizes=(3,))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("steps=abc", "steps"),
        ("steps=1.5", "steps"),
        ("optim.name=lamb", "not one of"),
        ("optim.betas=[0.9]", "expected 2 items"),
        ("nokey", "key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(Root, None, [override])


def test_save_roundtrip(tmp_path):
    cfg = C.load(Root, None, ["optim.lr=0.5", "tag=x"])
    path = C.save(cfg, tmp_path / "run" / "config.yaml")
    assert C.load(Root, path) == cfg


def test_validation_in_post_init_is_reported():
    with pytest.raises(C.ConfigError, match="split_fractions"):
        C.load(IngestConfig, None, ["split_fractions=[0.5, 0.5, 0.5]"])


def test_every_yaml_under_configs_loads(tmp_path):
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "no configs found"
    for path in files:
        kind = path.relative_to(ROOT / "configs").parts[0]
        assert kind in CONFIG_KINDS, f"{path}: no config class registered for configs/{kind}/"
        cfg = C.load(CONFIG_KINDS[kind], path)
        # the resolved config written next to a run must load back to the same config
        saved = C.save(cfg, tmp_path / path.name)
        assert C.load(CONFIG_KINDS[kind], saved) == cfg, path
