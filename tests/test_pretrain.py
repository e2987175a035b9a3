"""Pretraining on Ray Train, in tiers: unit (no Ray); the per-worker loop under a module-scoped
2-CPU `ray.init` (checkpoints, export, exact stop-and-resume, 1x4 vs 2x2 parity); and, marked slow,
`ray job submit` of the jobs on a real local cluster against the loopback S3 server (DINO, MAE,
a killed worker)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmct_ray import config as C
from fmct_ray.data.source import write_synthetic_store
from fmct_ray.models import load_backbone
from fmct_ray.train import checkpoint as ckpt
from fmct_ray.train.metrics import StepTimer
from fmct_ray.train.pretrain import PretrainConfig, build_task, micro_batches, resolve, run_length

ROOT = Path(__file__).resolve().parents[1]
DINO = ROOT / "configs" / "pretrain" / "debug_dino_tiny.yaml"
MAE = ROOT / "configs" / "pretrain" / "debug_mae_tiny.yaml"


def recipe(path, store, *overrides):
    return C.load(PretrainConfig, path, [f"data.sites=[{{name: A, uri: '{store}'}}]", *overrides])


# -- unit ------------------------------------------------------------------------------------
def test_run_length_and_resolve():
    cfg = C.load(PretrainConfig, DINO, ["train.warmup_epochs=1", "train.freeze_last_layer_epochs=0.5"])
    length = run_length(cfg, samples_per_epoch=10, world_size=2)  # global batch 4 -> 2 steps/epoch
    assert (length.global_batch, length.steps_per_epoch, length.total_steps) == (4, 2, 4)
    r = resolve(cfg, length)
    assert (r.optim.warmup_steps, r.dino.freeze_last_layer_steps, r.dino.total_steps) == (2, 1, 4)
    assert C.load(PretrainConfig, C.save(r, Path(os.environ.get("TMPDIR", "/tmp")) / "r.yaml")) == r


def test_checkpoint_roundtrip(tmp_path):
    cfg = C.load(PretrainConfig, DINO)
    task = build_task(cfg)
    opt = torch.optim.AdamW(task.student.parameters())
    task.dino_loss.center.fill_(0.5)
    torch.manual_seed(7)
    ckpt.save(tmp_path, 0, task=task, optimizer=opt, state={"step": 3, "samples": 6}, cfg=cfg)
    expected = torch.rand(3)
    other = build_task(C.load(PretrainConfig, DINO, ["train.seed=1"]))
    state = ckpt.load(tmp_path, 0, other, torch.optim.AdamW(other.student.parameters()))
    assert state == {"step": 3, "samples": 6}
    assert torch.equal(other.dino_loss.center, task.dino_loss.center)
    for a, b in zip(other.state_dict().values(), task.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected)  # RNG state restored
    assert C.load(PretrainConfig, tmp_path / "config.yaml") == cfg


def test_resume_position_reads_the_latest_registered_checkpoint(tmp_path):
    assert ckpt.ResumePosition(str(tmp_path), "run")() == 0
    (tmp_path / "run").mkdir()
    snap = {"latest_checkpoint_result": {"checkpoint_dir_name": "c", "metrics": {"samples": 12}}}
    (tmp_path / "run" / ckpt.SNAPSHOT).write_text(json.dumps(snap))
    assert ckpt.ResumePosition(str(tmp_path), "run")() == 12


def test_micro_batches_group_and_skip_consumed_samples():
    batches = [{"index": torch.tensor([2 * i, 2 * i + 1])} for i in range(6)]
    groups = list(micro_batches(batches, 2, start_sample=4, timer=StepTimer()))
    assert [[int(b["index"][0]) for b in g] for g in groups] == [[4, 6], [8, 10]]


# -- Ray: the per-worker loop under ray.init ---------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "A")
    write_synthetic_store(path, 8, site="A")
    return path


@pytest.fixture(scope="module")
def ray2():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def fit(cfg, tmp_path, name, workers=1):
    from fmct_ray.train.trainer import LaunchConfig, pretrain

    launch = LaunchConfig(
        name=name, storage_path=str(tmp_path), num_workers=workers, cpus_per_worker=0.5, max_failures=0
    )
    result = pretrain(cfg, launch)
    assert result.error is None, result.error
    return result


def rows(checkpoint_dir) -> list[dict]:
    with open(Path(checkpoint_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_dino_run_checkpoints_and_exports(ray2, store, tmp_path):
    result = fit(recipe(DINO, store), tmp_path, "dino")
    assert result.metrics["step"] == 8 and result.metrics["samples"] == 16
    d = Path(result.checkpoint.path)
    assert {
        "task.pt",
        "optimizer.pt",
        "state.json",
        "config.yaml",
        "rng_rank0.pt",
        "metrics.csv",
        "teacher_backbone.pt",
    } <= {p.name for p in d.iterdir()}
    log = rows(d)
    assert [int(r["step"]) for r in log] == list(range(1, 9))
    for key in (
        "loss",
        "dino",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "scans_per_s",
        "data_wait_frac",
        "peak_mem_gb",
    ):
        assert all(r[key] != "" for r in log), key
    task = torch.load(d / "task.pt", weights_only=True)
    backbone = load_backbone(d / "teacher_backbone.pt")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, task[f"teacher.backbone.{k}"]), k
    assert (
        len([p for p in Path(tmp_path, "dino").iterdir() if p.is_dir() and p.name.startswith("checkpoint_")])
        == 2
    )


def test_stop_and_resume_equals_uninterrupted(ray2, store, tmp_path):
    full = fit(recipe(DINO, store), tmp_path, "full")
    part = fit(recipe(DINO, store, "train.stop_after=3"), tmp_path, "part")
    assert part.metrics["step"] == 3
    resumed = fit(recipe(DINO, store), tmp_path, "part")
    assert resumed.metrics["step"] == 8
    a = torch.load(Path(full.checkpoint.path) / "task.pt", weights_only=True)
    b = torch.load(Path(resumed.checkpoint.path) / "task.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in rows(full.checkpoint.path)] == [
        r["loss"] for r in rows(resumed.checkpoint.path)
    ]


def test_one_by_four_equals_two_by_two_first_step(ray2, store, tmp_path):
    no_aug = [
        "augment.flip_prob=0",
        "augment.shift_prob=0",
        "augment.smooth_prob=0",
        "augment.gamma_prob=0",
        "train.max_steps=1",
    ]
    one = fit(recipe(DINO, store, "train.batch_size=4", *no_aug), tmp_path, "one", workers=1)
    two = fit(recipe(DINO, store, "train.batch_size=2", *no_aug), tmp_path, "two", workers=2)
    assert one.metrics["global_batch"] == two.metrics["global_batch"] == 4
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], rel=1e-4)


# -- slow: `ray job submit` on a real local cluster, stores and checkpoints on loopback S3 ----------
@pytest.fixture(scope="module")
def s3_store(s3):
    s3.filesystem().mkdir("data")
    s3.filesystem().mkdir("runs")
    write_synthetic_store("s3://data/siteA", 8, site="A")
    return "s3://data/siteA"


def submit(cluster, s3, store, job, recipe_path, name, *extra, wait=True):
    args = ["python", f"jobs/{job}.py", "--config", str(recipe_path.relative_to(ROOT)),
            "--stores", f"A={store}", "--num-workers", "2", "--cpus-per-worker", "0.5",
            "--storage", "s3://runs", "--name", name, *extra]
    if wait:
        return cluster.submit(*args, working_dir=str(ROOT), env=s3.env(), timeout=900)
    return args


def s3_checkpoints(s3, name) -> list[str]:
    fs = s3.filesystem()
    fs.invalidate_cache()
    return sorted(p for p in fs.ls(f"runs/{name}") if p.rsplit("/", 1)[-1].startswith("checkpoint_2"))


def check_final_checkpoint(s3, name, steps):
    fs = s3.filesystem()
    last = s3_checkpoints(s3, name)[-1]
    state = json.loads(fs.cat_file(f"{last}/state.json"))
    assert state["step"] == steps
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(last)}
    assert {"task.pt", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt", "teacher_backbone.pt"} <= names
    return last


@pytest.fixture(scope="module")
def cluster():
    from fmct_ray.testing import RayCluster

    with RayCluster(num_cpus=2) as c:
        # The job agent comes up after `ray start` returns ("No available agent to submit job").
        for _ in range(40):
            out = c.ray("job", "submit", f"--address={c.dashboard}", "--", "python", "-c", "pass",
                        timeout=120)
            if out.returncode == 0:
                break
            time.sleep(3)
        yield c


@pytest.mark.slow
@pytest.mark.parametrize("job, path", [("pretrain_dino", DINO), ("pretrain_mae", MAE)])
def test_job_submit_on_local_cluster(cluster, s3, s3_store, job, path):
    out = submit(cluster, s3, s3_store, job, path, f"{job}-submit")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # 8 scans, 2 workers x batch 2 -> 2 steps per epoch, 2 epochs
    check_final_checkpoint(s3, f"{job}-submit", 4)


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(cluster, s3, s3_store):
    name = "dino-kill"
    args = submit(cluster, s3, s3_store, "pretrain_dino", DINO, name, "--set", "train.epochs=6", "--set",
                  "train.checkpoint_every=2", wait=False)
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={cluster.dashboard}",
           f"--working-dir={ROOT}", f"--runtime-env-json={json.dumps({'env_vars': s3.env()})}", "--", *args]
    job = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not s3_checkpoints(s3, name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert s3_checkpoints(s3, name), "no checkpoint appeared"
    pids = train_worker_pids(cluster)
    assert pids, "no RayTrainWorker found"
    os.kill(pids[-1], signal.SIGKILL)
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-4000:]
    check_final_checkpoint(s3, name, 12)  # 6 epochs x 2 steps: the right step count after the restart
    assert "restart" in out.lower() or "fail" in out.lower(), "the kill did not register"


def train_worker_pids(cluster) -> list[int]:
    out = cluster.ray("list", "actors", f"--address={cluster.address}", "--filter",
                      "class_name=RayTrainWorker", "--filter", "state=ALIVE", "--format", "json", timeout=60)
    return [int(a["pid"]) for a in json.loads(out.stdout or "[]")]
