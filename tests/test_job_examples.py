"""Every job's docstring examples run as written (issue 12), on tiny inputs.

Each `python jobs/...` command of each job's docstring (with its `ray job submit ... --` prefix,
where it has one) is found here. The fast test checks that each has a case below. The slow test
runs each, in order: `ray job submit` commands on one local Ray cluster (`ray start`, 8 logical
CPUs, resources `site_a` and `site_b`, through its dashboard), `python jobs/...` commands with a
local Ray of their own, as on a workstation; the site secret and the loopback S3 server's
credentials in the environment, and that server behind every s3:// URI as written (bucket
`bucket`). What a case changes, and only that:
- placeholders (`<recipe>`, `NAME`, `PATH_OR_URI`, `/data/...` folders, `...`) become tiny inputs;
- `[optional]` parts are dropped, or kept where the case says so;
- GPU requests become CPU ones (no GPU here; 2 embedding actors where the GPU example has 4);
- `extra` arguments appended after the command as written make the run tiny (fewer epochs,
  rounds, tasks; a later `--set` or flag wins).
Relative paths are relative to each case's folder, which holds copies of `jobs/` and `configs/`
(`--working-dir .` uploads it: the `ray job submit` cases' folder holds nothing else, as a
repository would, their data elsewhere) and the inputs the command names, made by the fixture or by an
earlier example (the sweep reads the embed stage's output, the report the sweep's).
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import serve_s3

ROOT = Path(__file__).resolve().parents[1]
SECRET = "job-examples-secret"


def examples(job: Path) -> list[str]:
    """The commands of a job's docstring: `python jobs/...` lines (a `ray job submit` prefix kept),
    joined across `\\` continuations; a line of `[...]` right after one is its optional part."""
    doc = ast.get_docstring(ast.parse(job.read_text()), clean=True) or ""
    out: list[str] = []
    cont = False
    for raw in doc.splitlines():
        line = raw.split(" #")[0].strip() if not raw.strip().startswith("#") else ""
        if line.startswith(("python jobs/", "ray job submit")) and "python jobs/" in line:
            out.append(line.rstrip("\\").strip())
        elif out and line and (cont or line.startswith("[")):
            out[-1] += " " + line.rstrip("\\").strip()
        cont = line.endswith("\\")
    return out


@dataclass(frozen=True)
class Case:
    """How one example runs: its folder, placeholder replacements, whether its `[optional]` parts
    are kept, and arguments appended to make it tiny."""

    cwd: str
    replace: dict[str, str] = field(default_factory=dict)
    keep_optional: bool = False
    extra: tuple[str, ...] = ()


def sets(*pairs: str) -> tuple[str, ...]:
    return tuple(a for kv in pairs for a in ("--set", kv))


TINY_FINETUNE = sets(
    "sweep.tasks=[Hydrocephalus]", "sweep.modes=[linear]", "sweep.shots=[0, 4]", "sweep.seeds=1",
    "train.epochs=2", "train.samples_per_epoch=16", "train.small_samples_per_epoch=16",
)  # fmt: skip
TINY_STUDY = sets(
    "corpus_scans=16", "pool_scans=24", "test_scans=24", "overrides=[train.epochs=1]", "shots=[2, 4]",
    "draws=2", "scratch_epochs=1",
)  # fmt: skip
CASES: dict[tuple[str, int], Case] = {
    ("demo", 0): Case("demo", keep_optional=True),
    ("finetune", 0): Case("sites", {"--actors 4 --gpus-per-actor 1": "--actors 2 --gpus-per-actor 0"}),
    ("finetune", 1): Case("sites", extra=TINY_FINETUNE),
    ("finetune", 2): Case("suite", extra=(*sets("probe.epochs=5"), "--cpus-per-trial", "0.5")),
    ("ingest", 0): Case("sites", {"NAME": "I", "PATH_OR_URI": "raw", "STORE_URI": "s3://bucket/ingested"}),
    ("ingest", 1): Case(
        "submit", {"...": "--site I2 --input {root}/sites/raw --output s3://bucket/ingested2"}
    ),
    ("labels", 0): Case("sites", keep_optional=True),
    ("labels", 1): Case("rsna", {"/data/rsna-store": "rsna-store"}),
    ("labels", 2): Case("cq500", {"/data/cq500-store": "cq500-store"}),
    ("pretrain_dino", 0): Case(
        "submit", {"<recipe>": "debug_dino_tiny", "/data/": "{root}/data/", "--gpu": ""}
    ),
    ("pretrain_mae", 0): Case(
        "submit",
        {"<recipe>": "debug_mae_tiny", "/data/": "{root}/data/", "--gpu": "", "my-run": "my-mae-run"},
    ),
    ("pretrain_federated", 0): Case(
        "submit",
        {"<recipe>": "debug_dino_tiny", "<sites>": "examples"},
        extra=("--rounds", "2", "--local-steps", "2"),
    ),
    ("report", 0): Case("sites"),
    ("report", 1): Case("suite"),
    ("study", 0): Case("study", extra=TINY_STUDY),
    ("study", 1): Case("study", extra=TINY_STUDY),
    ("study", 2): Case("study", {"/tmp/s": "study_out"}),
    ("sweep_scratch", 0): Case(
        "sites",
        {"--gpus-per-trial 1": "--gpus-per-trial 0"},
        extra=(
            *TINY_FINETUNE,
            *sets(
                "backbone.preset=vit3d_tiny",
                "view.size=32",
                "sweep.scratch_lrs=[1e-3]",
                "sweep.scratch_weight_decays=[0.01]",
                "sweep.scratch_epochs=[1]",
                "sweep.scratch_optimizers=[adamw]",
            ),  # fmt: skip
        ),
    ),  # fmt: skip
}
ALL = [
    (job.stem, i, cmd) for job in sorted((ROOT / "jobs").glob("*.py")) for i, cmd in enumerate(examples(job))
]


def test_every_docstring_example_has_a_case():
    """A job whose docstring gains, loses or reorders an example must update CASES (and so run)."""
    assert {(job, i) for job, i, _ in ALL} == set(CASES)
    assert all(c.startswith(("python jobs/", "ray job submit")) for _, _, c in ALL)


def command(job: str, i: int, text: str, root: Path = Path("/ROOT")) -> list[str]:
    case = CASES[(job, i)]
    for old, new in case.replace.items():
        text = text.replace(old, new.format(root=root))
    text = re.sub(r"(?<!\S)\[([^\]]*)\](?!\S)", r"\1" if case.keep_optional else "", text)  # [optional]
    return [*shlex.split(text), *case.extra]


# -- the tiny inputs ------------------------------------------------------------------------------
def _folder(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for sub in ("jobs", "configs"):
        if not (d / sub).exists():
            shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    return d


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(cmd)} in {cwd}:\n{text[-5000:]}"
    return text


@pytest.fixture(scope="module")
def s3():
    """A server of this module's own: the examples write to `s3://bucket/` as written, a bucket
    that other modules' tests create on the session's server (make test-all errored on it)."""
    with serve_s3() as server:
        yield server


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3):
    """The cluster, its environment, and every case folder with the inputs its commands name."""
    import yaml

    from fmct_ray.ingest import SiteStore
    from fmct_ray.models import create_model, save_backbone
    from fmct_ray.synthetic import write_site, write_store
    from fmct_ray.testing import RayCluster

    root = tmp_path_factory.mktemp("examples")
    fs = s3.filesystem()
    fs.mkdir("bucket")
    cluster = RayCluster(num_cpus=8, resources='{"site_a": 1, "site_b": 1}')
    cluster.env.update(s3.env(), FMCT_SITE_SECRET=SECRET)
    with cluster:
        # `ray job submit` goes to the cluster; `python jobs/...` starts a local Ray of its own, as on a
        # workstation (relative paths are then the job's own folder, for its workers too)
        submit = {**cluster.env, "RAY_API_SERVER_ADDRESS": cluster.dashboard}
        env = {k: v for k, v in submit.items() if not k.startswith(("RAY_AUTH", "RAY_API"))}
        sites = _folder(root, "sites")
        # sites A and B on S3 (pretraining reads A and a local B; the downstream examples A and B)
        write_store(str(root / "data" / "siteB"), 8, site="B")
        rows = [
            write_store(f"s3://bucket/site{s}", 40, site=s, splits=("train", "train", "val", "test"), seed=k)
            for k, s in enumerate("AB")
        ]
        labels = pd.concat(rows).rename(columns={"hydrocephalus": "Hydrocephalus"})
        labels[["scan_id", "patient_id", "site", "split", "Hydrocephalus"]].to_parquet(
            sites / "labels.parquet"
        )
        save_backbone(sites / "runs" / "dino" / "teacher_backbone.pt", create_model("vit3d_tiny"))
        write_site(sites / "raw", n=2, seed=5)
        sites_file = {
            "sites": [
                {"name": "site_a", "uri": "s3://bucket/siteA", "resource": "site_a"},
                {"name": "site_b", "uri": str(root / "data" / "siteB"), "resource": "site_b"},
            ]
        }
        # `ray job submit --working-dir .` uploads the folder: the repository's files only, data elsewhere
        submit_dir = _folder(root, "submit")
        (submit_dir / "configs" / "sites" / "examples.yaml").write_text(yaml.safe_dump(sites_file))
        scans = SiteStore("s3://bucket/siteA").manifest()
        t0 = pd.Timestamp("2024-03-01")
        pd.DataFrame({"scan_id": scans["scan_id"], "scan_time": t0}).to_csv(
            sites / "scan_times.csv", index=False
        )
        pd.DataFrame(
            {
                "patient_id": scans["patient_id"],
                "time": t0 + pd.Timedelta(days=3),
                "code": np.resize(["I61.0", "G91.1"], len(scans)),
            }
        ).to_parquet(sites / "ehr.parquet")
        # the probe suite: a store with every kind of target, its label table and token embeddings
        suite = _folder(root, "suite")
        records = write_store(
            str(suite / "store"),
            40,
            site="s",
            splits=("train", "train", "val", "test"),
            survival=True,
            masks=True,
        )
        records.to_parquet(suite / "labels.parquet")
        _run(
            [sys.executable, "jobs/finetune.py", "embed", "--config", "configs/finetune/debug_tiny.yaml",
             "--set", "view.size=64", "--stores", "s=store", "--out", "embeddings.parquet", "--tokens"],
            suite, env,
        )  # fmt: skip
        # RSNA 2019 and CQ500 as published, ingested by the ingest job
        from public_datasets import write_cq500, write_rsna

        for name, write, images, site in (
            ("rsna", lambda d: write_rsna(d, n_series=3), "stage_2_train", "R"),
            ("cq500", lambda d: write_cq500(d, n_patients=2), "images", "C"),
        ):
            d = _folder(root, name)
            write(d)
            store = f"{name}-store"
            _run(
                [sys.executable, "jobs/ingest.py", "--site", site, "--input", images, "--output", store],
                d,
                env,
            )
        _folder(root, "demo")
        _folder(root, "study")
        yield root, env, submit


@pytest.mark.slow
@pytest.mark.parametrize(("job", "i", "text"), ALL, ids=[f"{j}-{i}" for j, i, _ in ALL])
def test_docstring_example_runs(world, job, i, text):
    root, env, submit = world
    case = CASES[(job, i)]
    cwd = root / case.cwd
    out = _run(
        command(job, i, text, root), cwd, submit if text.startswith("ray job submit") else env, timeout=1200
    )
    if "ray job submit" in text:
        assert "succeeded" in out, out[-3000:]
    check = CHECKS.get((job, i))
    if check:
        check(cwd, out)


# -- what each example leaves behind ----------------------------------------------------------------
def _exists(*paths):
    def check(cwd: Path, out: str) -> None:
        for p in paths:
            assert (cwd / p).exists(), f"{p} missing in {cwd}"

    return check


CHECKS = {
    ("demo", 0): _exists("demo_out/figures/site_a_stored_volume.png", "demo_out/labels/labels.parquet"),
    ("finetune", 2): _exists("runs/study/probe_predictions", "runs/study/segmentations"),
    ("labels", 0): _exists("labels/siteA/labels.parquet", "labels/siteA/label_report.md"),
    ("labels", 1): _exists("labels/rsna2019/labels.parquet"),
    ("labels", 2): _exists("labels/cq500/labels.parquet"),
    ("report", 0): _exists("report/results.md", "report/fewshot_Hydrocephalus.png"),
    ("report", 1): _exists("report/suite.md", "report/suite_segmentation_anatomy.png"),
    ("study", 2): _exists("study_out/report/results.md"),
}


def test_examples_are_parsed_with_their_continuations():
    """The parser on the three docstring shapes: `\\` continuations (raw docstrings), one long line
    (a plain docstring turns `\\` + newline into nothing), and a `[...]` line after a command."""
    labels = dict(((j, i), c) for j, i, c in ALL)
    assert labels[("labels", 0)].endswith("--out labels/siteA [--scan-times scan_times.csv]")
    assert labels[("finetune", 1)].endswith("--cpus-per-trial 0.25 --gpus-per-trial 0")
    assert command("pretrain_dino", 0, labels[("pretrain_dino", 0)])[:5] == [
        "ray", "job", "submit", "--working-dir", ".",
    ]  # fmt: skip
    assert "--gpu" not in command("pretrain_dino", 0, labels[("pretrain_dino", 0)])
    assert "overrides=[train.epochs=1]" in command("study", 2, labels[("study", 2)])  # not an [optional] part
    assert "train.epochs=300" not in " ".join(command("pretrain_dino", 0, labels[("pretrain_dino", 0)]))
    assert np.all([c.startswith("python jobs/") or c.startswith("ray job submit") for c in labels.values()])
