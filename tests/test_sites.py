"""Sites files (load, validate, refuse secrets) and node-restricted reading on a two-node local
Ray cluster: every read of a restricted site's store happens on that site's node."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fmct_ray import config as config_lib
from fmct_ray.data.crops import MultiCropConfig
from fmct_ray.data.sampling import Plan
from fmct_ray.data.source import DataConfig, build_dataset
from fmct_ray.ingest.store import SiteStore
from fmct_ray.sites import (
    SitesConfig,
    SiteSpec,
    job_sites,
    load_sites,
    remote_args,
    secret_findings,
    site_scan_ids,
)
from fmct_ray.storage import StorageConfig
from fmct_ray.synthetic import write_store
from fmct_ray.testing import START_ATTEMPTS, RayCluster, free_ports, kill_processes_under

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
sites:
  - name: a
    uri: s3://bucket-a/store
    storage: {endpoint_url: http://127.0.0.1:9000, key_env: SITE_A_KEY, secret_env: SITE_A_SECRET}
    weight: 2
    resource: site_a
  - name: b
    uri: /data/b
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sites.yaml"
    path.write_text(text)
    return path


def test_every_sites_file_under_configs_loads_to_sitespecs():
    files = sorted((ROOT / "configs" / "sites").glob("*.yaml"))
    assert files
    for path in files:
        sites = load_sites(path)
        assert sites and all(type(s) is SiteSpec for s in sites)
        # the generic config loader (tests/test_config.py) reads the same files the same way
        assert config_lib.load(SitesConfig, path).sites == sites


def test_sites_file_gives_the_data_paths_sitespecs(tmp_path):
    sites = load_sites(write(tmp_path, GOOD))
    assert sites == (
        SiteSpec(
            "a",
            "s3://bucket-a/store",
            StorageConfig(
                endpoint_url="http://127.0.0.1:9000", key_env="SITE_A_KEY", secret_env="SITE_A_SECRET"
            ),
            weight=2.0,
            resource="site_a",
        ),
        SiteSpec("b", "/data/b"),
    )
    # the bare-list format that `jobs/pretrain_*.py --sites` reads today gives the same sites
    bare = "\n".join(line[2:] for line in GOOD.splitlines()[1:])
    assert load_sites(write(tmp_path, bare)) == sites


SECRETS = [
    ("key_env: AKIAIOSFODNN7EXAMPLE", "AWS access key id"),
    ("profile: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "secret key or token"),
    ("# old key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "secret key or token"),
    ("endpoint_url: https://admin:hunter22@minio.example.org", "password in a URL"),
    ("secret_access_key: hunter22", "literal credential key"),
    ("aws_secret_access_key: hunter22", "literal credential key"),
    ("endpoint_url: https://b.s3.amazonaws.com/x?X-Amz-Credential=abc", "signed or token-bearing URL"),
    ("profile: '-----BEGIN RSA PRIVATE KEY-----'", "private key"),
]


@pytest.mark.parametrize("line, what", SECRETS)
def test_a_sites_file_with_a_secret_is_refused_without_echoing_it(tmp_path, line, what):
    path = write(tmp_path, f"sites:\n  - name: a\n    uri: s3://bucket-a/store\n    storage:\n      {line}\n")
    with pytest.raises(config_lib.ConfigError) as err:
        load_sites(path)
    message = str(err.value)
    assert str(path) in message and what in message and "line 5" in message
    value = line.split(":", 1)[1].strip().strip("'")
    assert value not in message, "the error must not repeat the secret"


def test_secret_scan_leaves_ordinary_sites_alone():
    text = (ROOT / "configs" / "sites" / "two_hospitals_s3.yaml").read_text() + GOOD
    assert secret_findings(text) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (("name: b", "name: a"), "unique"),
        (("weight: 2", "weight: -1"), "weight"),
        (("resource: site_a", "resource: GPU"), "custom Ray resource"),
        (("key_env: SITE_A_KEY", "key_env: site a key"), "environment variable NAME"),
        (("key_env: SITE_A_KEY, ", ""), "both key_env and secret_env"),
        (("weight: 2", "wieght: 2"), "unknown key"),
        (("uri: /data/b", "uri: 7"), "expected str"),
        (("uri: s3://bucket-a/store", "uri: bucket-a/store"), "has no scheme"),
        (("uri: /data/b", "uri: s4://data/b"), "no file system knows the scheme 's4'"),
        (("uri: /data/b", "uri: s3://"), "names no bucket"),
    ],
)
def test_bad_sites_files_name_the_file_and_the_reason(tmp_path, change, message):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(config_lib.ConfigError, match=message) as err:
        load_sites(path)
    assert str(path) in str(err.value)
    with pytest.raises(config_lib.ConfigError, match="no sites"):
        load_sites(write(tmp_path, "sites: []\n"))


def test_every_job_names_its_sites_one_way(tmp_path):
    """`--stores NAME=URI` and `--sites FILE`, parsed and checked together (fmct_ray.cli)."""
    from fmct_ray.cli import add_store_args, sites_from_args

    p = argparse.ArgumentParser()
    add_store_args(p, sites_file=True)
    path = write(tmp_path, GOOD)
    sites = sites_from_args(p.parse_args(["--stores", "c=/data/c", "d=s3://bucket/d", "--sites", str(path)]))
    assert [(s.name, s.uri) for s in sites] == [
        ("c", "/data/c"),
        ("d", "s3://bucket/d"),
        ("a", "s3://bucket-a/store"),
        ("b", "/data/b"),
    ]
    assert sites[2] == load_sites(path)[0]  # the file's storage, weight and resource
    assert job_sites() == ()  # a recipe may list its own
    # a relative local path is the job's folder's: made absolute for workers and trials elsewhere
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert [s.uri for s in job_sites(["e=stores/e", "f=file:///x"])] == [
            str(tmp_path / "stores/e"),
            "file:///x",
        ]
    for argv, message in [
        (["--stores", "/data/c"], "expected NAME=URI"),
        (["--stores", "s3://bucket/x=1"], "expected NAME=URI"),
        (["--stores", "b=/data/c", "--sites", str(path)], "unique"),
        (["--stores", "c=s5://bucket/c"], "no file system knows the scheme 's5'"),
    ]:
        with pytest.raises(ValueError, match=message):
            job_sites(p.parse_args(argv).stores, p.parse_args(argv).sites)
        with pytest.raises(SystemExit, match="sites: "):
            sites_from_args(p.parse_args(argv))


def test_remote_args_ask_for_a_sliver_of_the_site_resource():
    assert remote_args(SiteSpec("a", "/x", resource="site_a")) == {"resources": {"site_a": 0.001}}
    assert remote_args(SiteSpec("b", "/x")) == {}


# -- two local Ray nodes: site_a's node and site_b's node -----------------------------------------
def audit_filesystem() -> type:
    """`audit://<local path>`: the local filesystem, recording every read with the node, process
    and node tag it happened on (one JSON-lines file per process under $FMCT_AUDIT_DIR).

    Built inside each process (fsspec classes hold locks and cannot be shipped to workers)."""
    from fsspec.implementations.local import LocalFileSystem

    class AuditFS(LocalFileSystem):
        protocol = ("audit",)

        def __init__(self, *args, **storage_options):
            super().__init__()  # storage options (endpoint, keys) mean nothing for local files

        @classmethod
        def _strip_protocol(cls, path):
            path = path[0] if isinstance(path, list) else str(path)
            return super()._strip_protocol(path.removeprefix("audit://"))

        def _record(self, op: str, path: str) -> None:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
            entry = {
                "op": op,
                "path": str(path),
                "pid": os.getpid(),
                "node_id": node,
                "node_tag": os.environ.get("FMCT_TEST_NODE", "driver"),
            }
            with open(Path(os.environ["FMCT_AUDIT_DIR"]) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

        def _open(self, path, mode="rb", **kwargs):
            if "r" in mode:
                self._record("open", path)
            return super()._open(path, mode=mode, **kwargs)

        def ls(self, path, detail=False, **kwargs):
            self._record("ls", path)
            return super().ls(path, detail=detail, **kwargs)

        def info(self, path, **kwargs):
            self._record("info", path)
            return super().info(path, **kwargs)

    return AuditFS


def register_audit() -> None:
    """worker_process_setup_hook: every Ray worker of the test job knows `audit://`."""
    import fsspec

    fsspec.register_implementation("audit", audit_filesystem(), clobber=True)


# `ray start` of a second node on loopback. LOOPBACK_RAY_ENV's switch (=0) makes `ray start`
# refuse to join a cluster, and with it on (=1) Ray rewrites 127.0.0.1 in --address to the host's
# outward IP, where the head does not listen: keep the address as given, change nothing else.
RAY_START_ON_LOOPBACK = (
    "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def start_worker_node(head: RayCluster, tmp: str, resources: dict, tag: str) -> None:
    """A second node joining `head`, carrying `resources` and FMCT_TEST_NODE=`tag` in the
    environment of its raylet (and so of every worker process it starts). Tried again on fresh
    ports like the head (RayCluster.__enter__) when the raylet misses Ray's 30 s to register."""
    env = {**head.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "FMCT_TEST_NODE": tag}
    for _ in range(START_ATTEMPTS):
        args = [
            sys.executable,
            "-c",
            RAY_START_ON_LOOPBACK,
            "start",
            f"--address={head.address}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
            *(
                f"--{name}={port}"
                for name, port in zip(
                    (
                        "node-manager-port",
                        "object-manager-port",
                        "dashboard-agent-listen-port",
                        "dashboard-agent-grpc-port",
                        "runtime-env-agent-port",
                        "metrics-export-port",
                    ),
                    free_ports(6),  # distinct: Ray refuses a port given to two components
                    strict=True,
                )
            ),
        ]
        out = subprocess.run(args, env=env, text=True, capture_output=True, timeout=180)
        if out.returncode == 0:
            return
        kill_processes_under(tmp)
    raise RuntimeError(f"worker node failed to start:\n{out.stdout}\n{out.stderr}")


def use_token_of(head: RayCluster, mp: pytest.MonkeyPatch) -> None:
    """Make this process, the driver, present `head`'s token. Ray caches a process's auth mode and
    token when its first cluster starts (any earlier `ray.init` in this pytest process, which runs
    with token auth by default): a driver left in another mode or with another token is refused by
    the nodes' workers when they ask it for an object ('OwnerDiedError') or register its actors
    ('SchedulingCancelled'), while tasks on the head's own node still pass. Reset that cache, as
    Ray's own tests do."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", head.env["RAY_AUTH_TOKEN"])
    mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    reset_auth_token_state()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head = site A's node (resource site_a), worker = site B's node (site_b), 1 CPU each; the
    driver (this process) connects to them. Yields (node ids by tag, audit dir,
    stores folder)."""
    import ray
    from ray import cloudpickle

    audit, stores = tmp_path_factory.mktemp("audit"), tmp_path_factory.mktemp("stores")
    for site in ("A", "B"):
        write_store(str(stores / site), 3, site=site, seed=ord(site))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    head = RayCluster(num_cpus=1, resources=json.dumps({"site_a": 1}))
    head.env.update(FMCT_TEST_NODE="A")
    worker_tmp = tempfile.mkdtemp(prefix="ray_w_")
    with head, pytest.MonkeyPatch.context() as mp:
        try:
            start_worker_node(head, worker_tmp, {"site_b": 1}, "B")
            mp.setenv("FMCT_AUDIT_DIR", str(audit))
            use_token_of(head, mp)
            register_audit()
            ray.init(
                address=head.address,
                runtime_env={
                    "worker_process_setup_hook": register_audit,
                    "env_vars": {"FMCT_AUDIT_DIR": str(audit)},
                },
            )
            deadline = time.monotonic() + 60
            while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            nodes = {
                tag: n["NodeID"]
                for n in ray.nodes()
                if n["Alive"]
                for tag, res in (("A", "site_a"), ("B", "site_b"))
                if res in n["Resources"]
            }
            assert set(nodes) == {"A", "B"}, ray.nodes()
            yield nodes, audit, stores
        finally:
            ray.shutdown()
            kill_processes_under(worker_tmp)
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()  # with the variables restored: later clusters of this process start clean


def reads_of(audit: Path, root: Path) -> list[dict]:
    entries = [json.loads(line) for f in audit.glob("*.jsonl") for line in f.read_text().splitlines()]
    return [e for e in entries if e["path"] == str(root) or e["path"].startswith(f"{root}/")]


def misplaced(audit: Path, root: Path, tag: str, node_id: str) -> list[dict]:
    """Reads of the store at `root` that did not happen on node `tag`."""
    return [e for e in reads_of(audit, root) if e["node_tag"] != tag or e["node_id"] != node_id]


def alias(stores: Path, site: str, name: str) -> Path:
    """A fresh path to a store, so that each test audits its own reads."""
    link = stores / name
    link.symlink_to(stores / site)
    return link


def read_all(site: SiteSpec) -> int:
    store = SiteStore(site.uri, site.storage)
    return sum(int(store.read_volume(i).shape[0]) for i in store.manifest()["scan_id"])


def test_restricted_reads_run_only_on_the_sites_node(two_nodes):
    import ray

    nodes, audit, stores = two_nodes
    roots = {tag: alias(stores, tag, f"{tag}_helper") for tag in nodes}
    sites = {tag: SiteSpec(tag, f"audit://{roots[tag]}", resource=f"site_{tag.lower()}") for tag in nodes}
    for site in sites.values():
        assert len(site_scan_ids(site)) == 3  # manifest read pinned to the site's node
        tasks = [ray.remote(read_all).options(num_cpus=0, **remote_args(site)).remote(site) for _ in range(4)]
        assert ray.get(tasks) == [3 * 224] * 4
    for tag, root in roots.items():
        assert len(reads_of(audit, root)) >= 5 * 4, "the audit must see the reads"
        assert misplaced(audit, root, tag, nodes[tag]) == []
    pids = {e["pid"] for e in reads_of(audit, roots["A"]) + reads_of(audit, roots["B"])}
    assert os.getpid() not in pids, "the driver read a restricted store"


def test_the_audit_catches_a_read_off_the_sites_node(two_nodes):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes, audit, stores = two_nodes
    root = alias(stores, "A", "A_misread")
    site = SiteSpec("A", f"audit://{root}", resource="site_a")
    on_b = NodeAffinitySchedulingStrategy(node_id=nodes["B"], soft=False)
    assert ray.get(ray.remote(read_all).options(num_cpus=0, scheduling_strategy=on_b).remote(site)) == 3 * 224
    wrong = misplaced(audit, root, "A", nodes["A"])
    assert wrong and {e["node_tag"] for e in wrong} == {"B"} and {e["node_id"] for e in wrong} == {nodes["B"]}


def test_labels_of_pinned_sites_are_made_on_their_nodes(two_nodes, tmp_path):
    """`site_labels` (the labels job): each pinned site's manifest and the label file are read on
    the site's node, never by the driver; labels and per-site report counts come back."""
    from fmct_ray.eval.labels import LabelConfig, TaskDefinition, site_labels

    nodes, audit, stores = two_nodes
    roots = {tag: alias(stores, tag, f"{tag}_labels") for tag in nodes}
    sites = [SiteSpec(tag, f"audit://{roots[tag]}", resource=f"site_{tag.lower()}") for tag in nodes]
    ids = {tag: sorted(SiteStore(str(stores / tag)).manifest()["scan_id"]) for tag in nodes}  # not audited
    table = pd.DataFrame({"scan_id": ids["A"] + ids["B"][:2] + ["elsewhere"], "hydro": [1, 0, 1, 0, 1, 0]})
    label_file = stores / "labels_file.csv"
    table.to_csv(label_file, index=False)
    cfg = LabelConfig(tasks={"Hydro": TaskDefinition(column="hydro")})
    labels, report = site_labels(cfg, sites, tmp_path / "out", public=f"audit://{label_file}")
    got = labels.set_index("scan_id")["Hydro"]
    assert got[ids["A"]].tolist() == [1, 0, 1] and got[ids["B"]].tolist() == [0, 1, pd.NA]
    assert sorted(labels["site"]) == ["A"] * 3 + ["B"] * 3
    report = report.set_index("sites")
    assert report.loc["B", "missing"] == 1 and "no row in the label file: 1" in report.loc["B", "reasons"]
    assert "not in the manifest (ignored): 3" in report.loc["A", "reasons"]  # B's rows + elsewhere
    assert (
        pd.read_parquet(tmp_path / "out" / "labels.parquet")["scan_id"].tolist() == labels["scan_id"].tolist()
    )
    for tag, root in roots.items():
        assert reads_of(audit, root), f"no read of site {tag}'s store recorded"
        assert misplaced(audit, root, tag, nodes[tag]) == []
    file_reads = reads_of(audit, label_file)
    assert {e["node_tag"] for e in file_reads} == {"A", "B"}
    assert os.getpid() not in {
        e["pid"] for e in file_reads + reads_of(audit, roots["A"]) + reads_of(audit, roots["B"])
    }


@pytest.mark.slow  # about 60 s: two Ray Data pipelines on 2 single-CPU nodes
def test_the_data_path_reads_each_site_on_its_node(two_nodes):
    """`build_dataset` (fmct_ray.data.source) with a plan whose manifests were read on the sites'
    nodes: the VolumeReader pipelines of A and B run where their resources are."""
    nodes, audit, stores = two_nodes
    roots = {tag: alias(stores, tag, f"{tag}_data") for tag in nodes}
    sites = tuple(SiteSpec(tag, f"audit://{roots[tag]}", resource=f"site_{tag.lower()}") for tag in nodes)
    crops = MultiCropConfig(global_size=16, n_local=0)
    cfg = DataConfig(sites=sites, crops=crops, readers=1, cpus_per_reader=0.5, volumes_per_task=1)
    plan = Plan(sites, tuple(site_scan_ids(s, "train") for s in sites), samples_per_epoch=6, seed=0)
    rows = build_dataset(cfg, total_samples=6, plan=plan).take_all()
    assert sorted(int(r["index"]) for r in rows) == list(range(6))
    assert sorted(int(r["site"]) for r in rows) == [0, 0, 0, 1, 1, 1]
    assert all(np.asarray(r["global"]).shape == (2, 16, 16, 16) for r in rows)
    for tag, root in roots.items():
        assert reads_of(audit, root), f"no reads of site {tag} recorded"
        assert misplaced(audit, root, tag, nodes[tag]) == []


@pytest.mark.slow  # about 25 s: two embedding actor pools on 2 single-CPU nodes
def test_embeddings_read_each_site_on_its_node(two_nodes, tmp_path):
    """`extract_embeddings` (the embedding job): each pinned site's manifest is listed and its
    volumes embedded on its own node; the driver gets ids and embeddings, and reads no byte."""
    from fmct_ray.data.embed import BackboneConfig, EmbedConfig, extract_embeddings, load_embeddings
    from fmct_ray.data.views import ViewConfig

    nodes, audit, stores = two_nodes
    roots = {tag: alias(stores, tag, f"{tag}_embed") for tag in nodes}
    sites = [SiteSpec(tag, f"audit://{roots[tag]}", resource=f"site_{tag.lower()}") for tag in nodes]
    cfg = EmbedConfig(
        backbone=BackboneConfig(preset="vit3d_tiny"),
        view=ViewConfig(size=32),
        batch_size=2,
        cpus_per_actor=0.5,
    )
    assert extract_embeddings(cfg, sites, str(tmp_path / "emb.parquet"), splits=("train",)) == 6
    frame = load_embeddings(str(tmp_path / "emb.parquet"))
    assert sorted(frame["site"]) == ["A"] * 3 + ["B"] * 3
    for tag, root in roots.items():
        assert len(reads_of(audit, root)) >= 1 + 3, f"the audit must see site {tag}'s manifest and volumes"
        assert misplaced(audit, root, tag, nodes[tag]) == []
    pids = {e["pid"] for e in reads_of(audit, roots["A"]) + reads_of(audit, roots["B"])}
    assert os.getpid() not in pids, "the driver read a pinned store"


def test_full_finetuning_reads_each_pinned_site_on_its_node(two_nodes, tmp_path):
    """A full fine-tuning sweep over two pinned sites (`SweepLaunch.resources`): each trial runs on
    its training site's node and predicts the other site's test scans on that site's node, so
    every read of a site's volumes happens on its node and none on a driver; both trials score
    both sites' test splits. The sweep's driver is a process of its own: Tune keeps state of the
    first cluster a process used (another test's), and its trials on this one then die unstarted."""
    import ray

    nodes, audit, stores = two_nodes
    splits = ("train", "train", "val", "val", "test", "test")
    rows = []
    for tag in nodes:
        rows.append(write_store(str(stores / f"{tag}_ft"), 6, site=tag, seed=ord(tag) + 1, splits=splits))
    labels = pd.concat(rows, ignore_index=True).assign(Hydro=[1, 0] * 6)  # both classes in every split
    labels[["scan_id", "patient_id", "site", "split", "Hydro"]].to_parquet(tmp_path / "labels.parquet")
    roots = {tag: alias(stores, f"{tag}_ft", f"{tag}_finetune") for tag in nodes}
    launch = dict(
        name="pinned",
        storage_path=str(tmp_path / "runs"),
        labels=str(tmp_path / "labels.parquet"),
        stores={tag: f"audit://{roots[tag]}" for tag in nodes},
        cpus_per_trial=0.5,
        resources={tag: f"site_{tag.lower()}" for tag in nodes},
    )
    overrides = [
        "task=Hydro",
        "mode=full",
        "view.size=32",
        "train.epochs=1",
        "train.samples_per_epoch=4",
        "train.small_samples_per_epoch=4",
        "sweep.tasks=[Hydro]",
        "sweep.modes=[full]",
        "sweep.shots=[0]",
    ]
    recipe = str(ROOT / "configs" / "finetune" / "debug_tiny.yaml")
    driver = f"""
import os, sys, ray
from ray import cloudpickle
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_sites
from fmct_ray import config
from fmct_ray.downstream.config import FinetuneConfig
from fmct_ray.downstream.tune import SweepLaunch, run_finetune_sweep
cloudpickle.register_pickle_by_value(test_sites)
hook = {{"worker_process_setup_hook": test_sites.register_audit}}
env = {{**hook, "env_vars": {{"FMCT_AUDIT_DIR": {str(audit)!r}}}}}
ray.init(address={ray.get_runtime_context().gcs_address!r}, runtime_env=env)
frame = run_finetune_sweep(config.load(FinetuneConfig, {recipe!r}, {overrides!r}), SweepLaunch(**{launch!r}))
print("pid", os.getpid(), "trials", len(frame))
"""
    env = {**os.environ, "FMCT_AUDIT_DIR": str(audit)}  # with the cluster's token (use_token_of)
    out = subprocess.run([sys.executable, "-c", driver], env=env, text=True, capture_output=True, timeout=600)
    assert " trials 2" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
    driver_pid = int(out.stdout.split("pid ")[-1].split()[0])
    preds = pd.concat(
        pd.read_parquet(p) for p in (tmp_path / "runs" / "pinned" / "predictions").glob("*.parquet")
    )
    assert sorted(preds.groupby(["train_site", "eval_site"]).size().items()) == [
        (("A", "A"), 2), (("A", "B"), 2), (("B", "A"), 2), (("B", "B"), 2)
    ]  # fmt: skip
    for tag, root in roots.items():
        assert reads_of(audit, root), f"no read of site {tag}'s store recorded"
        assert misplaced(audit, root, tag, nodes[tag]) == []
    pids = {e["pid"] for e in reads_of(audit, roots["A"]) + reads_of(audit, roots["B"])}
    assert not pids & {os.getpid(), driver_pid}, "a driver read a pinned store"
