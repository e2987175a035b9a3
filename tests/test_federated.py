"""Federated averaging (fmct_ray.train.federated): the weighted average, and a two-site run on two
local Ray nodes where each site's store is read only on its own node, with checkpoint and resume."""

import json
import os
from pathlib import Path

import pytest
import torch

# The two-node cluster and the read audit of tests/test_sites.py (module-scoped: one cluster here).
from test_sites import alias, misplaced, reads_of, two_nodes  # noqa: F401

from fmct_ray import config as C
from fmct_ray.sites import SiteSpec
from fmct_ray.train.checkpoint import task_state
from fmct_ray.train.federated import FederatedConfig, average_states, latest, run_federated
from fmct_ray.train.pretrain import PretrainConfig, build_task

ROOT = Path(__file__).resolve().parents[1]
DINO = ROOT / "configs" / "pretrain" / "debug_dino_tiny.yaml"


def test_average_is_weighted_by_site_size_and_keeps_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "h": torch.tensor([1.5], dtype=torch.float16), "n": torch.tensor(9)}
    avg = average_states([a, b], [1.0, 2.0])  # site b has twice the scans
    assert torch.allclose(avg["w"], torch.tensor([3.0, 6.0]))
    assert avg["h"].dtype == torch.float16 and float(avg["h"]) == pytest.approx(7 / 6, abs=1e-3)
    assert int(avg["n"]) == 3 and avg["n"].dtype == torch.int64  # integer counters: first site's
    assert torch.equal(average_states([a, b], [5.0, 0.0])["w"], a["w"])
    with pytest.raises(ValueError, match="one weight per state"):
        average_states([a, b], [1.0])
    with pytest.raises(ValueError, match="positive sum"):
        average_states([a, b], [0.0, 0.0])
    with pytest.raises(ValueError, match="different keys"):
        average_states([a, {"w": b["w"]}], [1.0, 1.0])


def test_federated_config_refuses_empty_rounds():
    with pytest.raises(ValueError, match="local_steps"):
        FederatedConfig(rounds=2, local_steps=0)


# slow tier: passes alone and with the files around it, but once failed late in a full default run
# (OwnerDiedError on the driver's ray.put after many earlier Ray sessions in the same process)
@pytest.mark.slow
def test_two_sites_train_on_their_own_nodes_and_resume_exactly(two_nodes, tmp_path):  # noqa: F811
    nodes, audit, stores = two_nodes
    roots = {tag: alias(stores, tag, f"{tag}_federated") for tag in nodes}
    # B first: Ray's default placement (the driver's node = A's node first) would put it on the wrong node
    sites = tuple(
        SiteSpec(tag, f"audit://{roots[tag]}", resource=f"site_{tag.lower()}") for tag in ("B", "A")
    )
    cfg = C.load(PretrainConfig, DINO)
    fed = FederatedConfig(rounds=2, local_steps=2, keep_checkpoints=2)
    runs = str(tmp_path / "runs")

    full = run_federated(cfg, fed, sites, runs, "full")
    assert full["round"] == 2 and full["step"] == 4 and full["sizes"] == [3, 3]
    assert [h["round"] for h in full["history"]] == [1, 2]
    folder = tmp_path / "runs" / "full"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "round_000001", "round_000002"]
    assert {"task.pt", "state.json", "config.yaml", "teacher_backbone.pt"} <= {
        p.name for p in (folder / "round_000002").iterdir()
    }
    assert "teacher_backbone.pt" not in {p.name for p in (folder / "round_000001").iterdir()}
    assert json.loads((folder / "latest.json").read_text()) == {"round": 2, "path": "round_000002"}

    # stopped after round 1, then re-run: resumes from the round-1 checkpoint, ends where `full` did
    first = run_federated(cfg, FederatedConfig(rounds=2, local_steps=2, stop_after=1), sites, runs, "resumed")
    assert first["round"] == 1 and latest(runs, "resumed")["round"] == 1
    round1 = tmp_path / "runs" / "resumed" / "round_000001" / "task.pt"
    mtime1 = round1.stat().st_mtime_ns
    resumed = run_federated(cfg, fed, sites, runs, "resumed")
    assert resumed["round"] == 2 and resumed["history"] == full["history"]
    assert round1.stat().st_mtime_ns == mtime1, "the re-run trained round 1 again instead of resuming"
    final_full, final_resumed = latest(runs, "full")["weights"], latest(runs, "resumed")["weights"]
    assert final_full.keys() == final_resumed.keys()
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    initial = task_state(build_task(cfg))
    assert any(not torch.equal(initial[k], final_full[k]) for k in initial), "training changed nothing"

    # a finished run re-run does nothing more
    mtime = (folder / "round_000002" / "task.pt").stat().st_mtime_ns
    assert run_federated(cfg, fed, sites, runs, "full")["round"] == 2
    assert (folder / "round_000002" / "task.pt").stat().st_mtime_ns == mtime

    # every read of each site's store happened on that site's node, none in this driver
    for tag, root in roots.items():
        assert len(reads_of(audit, root)) >= 10, f"the audit saw too few reads of site {tag}"
        assert misplaced(audit, root, tag, nodes[tag]) == []
    pids = {e["pid"] for tag in roots for e in reads_of(audit, roots[tag])}
    assert os.getpid() not in pids, "the driver read a site store"


def test_resume_refuses_a_different_run(two_nodes, tmp_path):  # noqa: F811
    nodes, _, stores = two_nodes
    root = alias(stores, "A", "A_federated_refuse")
    site = SiteSpec("A", f"audit://{root}", resource="site_a")
    cfg = C.load(PretrainConfig, DINO, ["train.export_backbone=false"])
    runs = str(tmp_path / "runs")
    run_federated(cfg, FederatedConfig(rounds=2, local_steps=1, stop_after=1), (site,), runs, "x")
    with pytest.raises(ValueError, match="rounds/local_steps"):
        run_federated(cfg, FederatedConfig(rounds=2, local_steps=2), (site,), runs, "x")
