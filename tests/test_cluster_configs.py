"""cluster/: launcher files pass Ray's own validation (offline), KubeRay manifests pass the CRD
schemas of ../shared/schemas/kuberay, and both keep the project's rules (head runs no work, GPU
and CPU pools scale from 0, credentials from roles, versions pinned in step with pyproject)."""

import copy
import functools
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from fmct_ray.sites import secret_findings
from fmct_ray.train.launch import job_parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
WHEEL = f"fmct_ray-{VERSION}-py3-none-any.whl"

# launcher file -> (instance family of its GPU pool, which must also name the file; role field)
LAUNCHERS = {
    "aws_p4d_a100.yaml": ("p4d.24xlarge", "IamInstanceProfile"),
    "gcp_a2_highgpu_a100.yaml": ("a2-highgpu-8g", "serviceAccounts"),
}
MANIFESTS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` checks before it calls the cloud: defaults merged, then the JSON schema and
    the cross-field rules of the installed Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_every_file_under_cluster_is_covered():
    yamls = {p.name for p in CLUSTER.glob("*.yaml")}
    kinds = {n for n in yamls if load(n).get("kind") in MANIFESTS}
    assert yamls == set(LAUNCHERS) | kinds, "a cluster file no test checks"


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_passes_rays_validation(name):
    prepared = ray_validate(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_shape_head_gpu_and_cpu_pools(name):
    gpu_instance, role = LAUNCHERS[name]
    cfg = load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "the head must run no tasks"
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) > 0]
    cpu = [v for v in workers.values() if v["resources"].get("GPU", 0) == 0]
    assert gpu and cpu
    for pool in gpu + cpu:  # autoscaling from zero
        assert pool["min_workers"] == 0 < pool["max_workers"]
    instance = lambda v: v["node_config"].get("InstanceType") or v["node_config"].get("machineType")  # noqa: E731
    assert {instance(v) for v in gpu} == {gpu_instance}
    assert all(v["resources"].get("cpu_pool") for v in cpu), "CPU pool must carry the cpu_pool resource"
    for key, node_type in types.items():
        assert role in node_type["node_config"], f"{name}: {key} has no instance role / service account"


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_pins_versions_and_holds_no_credentials(name):
    import ray

    text = (CLUSTER / name).read_text()
    cfg = load(name)
    mounts = cfg["file_mounts"]
    assert mounts.get(f"~/fmct/{WHEEL}") == f"dist/{WHEEL}", f"wheel must be {WHEEL} (pyproject version)"
    setup = " ".join(cfg["setup_commands"])
    assert (
        WHEEL in setup
        and '"torch==2.13.0"' in setup
        and f'"ray[default,train,tune,data]=={ray.__version__}"' in setup
    )
    images = re.findall(r"rayproject/ray:([\w.]+)-", text)
    assert images and set(images) == {ray.__version__}
    assert not secret_findings(text)
    assert "auth" not in cfg or "ssh_private_key" not in cfg["auth"]
    assert not [m for m in mounts if re.search(r"\.aws|credentials|\.json$|gcloud|\.pem$", m)], mounts


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda c: c["available_node_types"]["gpu_a100"]["resources"].update(GPU=0.5), "integer"),
        (lambda c: c["available_node_types"]["gpu_a100"].update(min_worker=1), "Additional properties"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c["available_node_types"]["cpu_ingest"].update(min_workers=20), "max_workers"),
        (lambda c: c["available_node_types"]["head"].pop("node_config"), "node_config"),
    ],
)
def test_rays_validation_rejects_a_broken_launcher(break_it, message):
    for name in LAUNCHERS:
        cfg = load(name)
        break_it(cfg)
        with pytest.raises(Exception, match=message):
            ray_validate(cfg)


# -- KubeRay ------------------------------------------------------------------------------------
def crd_schema(kind: str) -> dict:
    if not CRDS.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    return _crd_schema(kind)


@functools.cache
def _crd_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load((CRDS / MANIFESTS[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(node, schema: dict, where: str = "") -> list[str]:
    """Fields the schema does not declare. The API server prunes them silently (and kubectl's
    default strict field validation rejects them), so a typo'd field is an error here too."""
    if isinstance(node, list) and "items" in schema:
        return [
            e for i, item in enumerate(node) for e in unknown_fields(item, schema["items"], f"{where}[{i}]")
        ]
    if not isinstance(node, dict) or "properties" not in schema:
        return []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    for key, value in node.items():
        if key in schema["properties"]:
            out += unknown_fields(value, schema["properties"][key], f"{where}.{key}")
        elif "additionalProperties" not in schema:
            out.append(f"{where}.{key}")
    return out


def crd_errors(manifest: dict) -> list[str]:
    schema = crd_schema(manifest.get("kind", "RayCluster"))
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)
    ]
    return errors + [f"{f}: unknown field" for f in unknown_fields(manifest, schema)]


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(CLUSTER.glob("kuberay_*.yaml"))}


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def test_every_kuberay_manifest_passes_its_crd_schema():
    found = manifests()
    assert {m["kind"] for m in found.values()} == set(MANIFESTS)
    for name, manifest in found.items():
        assert manifest["apiVersion"] == "ray.io/v1"
        assert crd_errors(manifest) == [], name


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda s: s["workerGroupSpecs"][0].update(minReplicas="zero"), "is not of type 'integer'"),
        (lambda s: s["workerGroupSpecs"][1].pop("groupName"), "'groupName' is a required property"),
        (lambda s: s["authOptions"].update(mode="tokens"), "is not one of"),
        (lambda s: s.update(enableInTreeAutoscalling=True), "enableInTreeAutoscalling: unknown field"),
        (lambda s: s["headGroupSpec"].pop("template"), "'template' is a required property"),
    ],
)
def test_crd_schema_rejects_a_broken_manifest(break_it, message):
    for manifest in manifests().values():
        broken = copy.deepcopy(manifest)
        break_it(cluster_spec(broken))
        assert any(message in e for e in crd_errors(broken)), crd_errors(broken)


def test_kuberay_shape_token_auth_autoscaling_pools():
    for name, manifest in manifests().items():
        spec = cluster_spec(manifest)
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpus = {
            n: g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for n, g in groups.items()
        }
        assert any(gpus.values()) and not all(gpus.values()), "one GPU and one CPU-only group"
        for group in groups.values():
            assert group["minReplicas"] == 0 < group["maxReplicas"]
            assert group["template"]["spec"]["serviceAccountName"], "storage access from a service account"
        assert any(g.get("resources", {}).get("cpu_pool") for n, g in groups.items() if not gpus[n])
        assert not secret_findings((CLUSTER / name).read_text())


def test_rayjob_runs_pretrain_dino_on_the_raycluster_spec():
    found = {m["kind"]: m for m in manifests().values()}
    job, cluster = found["RayJob"], found["RayCluster"]
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "RayJob's cluster drifted from the RayCluster"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/pretrain_dino.py"]
    args = job_parser("").parse_args(argv[2:])  # the job's real flags
    assert (ROOT / args.config).exists() and args.use_gpu and args.name and args.storage
    images = {
        c["image"]
        for s in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
        for c in s["template"]["spec"]["containers"]
    }
    assert {i.rsplit(":", 1)[1] for i in images} == {VERSION}, images
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG FMCT_VERSION={VERSION}" in dockerfile and '"torch==2.13.0"' in dockerfile
