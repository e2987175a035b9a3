"""The sites file, and keeping each site's reads on the nodes that site allows.

A sites file (`configs/sites/*.yaml`) lists the stores a run reads. Each entry is exactly a
`SiteSpec` (name, store `uri`, `storage` = a `StorageConfig` holding the
endpoint and *references* to credentials, sampling `weight`, optional Ray `resource`), so the
file feeds the data path without a second type:

    sites:
      - name: hospital-a
        uri: s3://fmct-hospital-a/store
        storage: {endpoint_url: https://s3.eu-central-1.amazonaws.com, profile: hospital-a}
        weight: 1.0
        resource: site_hospital_a     # only nodes started with this custom resource read it

A site that names a `resource` is read only by tasks and actors scheduled with `remote_args(site)`,
which asks for a sliver of that resource; only the site's nodes advertise it (`ray start
--resources='{"site_hospital_a": 1}'`, a launcher node type's `resources`, a KubeRay worker
group's `resources`). Custom resources, not node labels, because every scheduler on the way
honours them: tasks, actors, Ray Data operators, the autoscalers of the launcher and of KubeRay.

Sites files are committed and copied next to runs, so `load_sites` refuses anything that looks
like a secret value (key ids, secret keys, private keys, passwords in URLs, literal `secret:`
keys) and says which line, without echoing it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmct_ray import config as config_lib
from fmct_ray.storage import StorageConfig, absolute


@dataclass(frozen=True)
class SiteSpec:
    """One site's store.

    Args:
        name: site name (logs; the row carries its position in `DataConfig.sites`).
        uri: store root, local folder or s3://bucket/prefix.
        storage: where the reader finds this site's credentials (never the secrets).
        weight: per-scan sampling weight; a site's share of an epoch is proportional to
            weight x its number of scans (all 1: every scan once per epoch).
        resource: custom Ray resource that pins this site's readers to its nodes (None: anywhere).
    """

    name: str
    uri: str
    storage: StorageConfig = field(default_factory=StorageConfig)
    weight: float = 1.0
    resource: str | None = None


# Fraction of a site resource each reader asks for: small enough that the node's CPUs, not the
# marker resource, bound how many readers run there (a node advertising 1 unit fits 1000).
SITE_RESOURCE_UNIT = 0.001

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESOURCE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")
_RESERVED_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}

# What a secret looks like in text. Each entry: (pattern, what it is). The messages never quote
# the match, so an error in a log does not leak the value it refused.
_SECRET_PATTERNS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\"?type\"?\s*:\s*\"?service_account\"?"), "a service-account key file"),
    (re.compile(r"://[^/\s:@]+:[^/\s@]+@"), "a password in a URL"),
    (
        re.compile(r"[?&](?:X-Amz-Credential|X-Amz-Signature|X-Goog-Signature|sig|token)=", re.I),
        "a signed or token-bearing URL",
    ),
    (
        re.compile(
            r"(?im)(?:^[\s-]*|[{,]\s*)[\"']?(?:aws_)?(?:secret(?:_access)?_key|access_key(?:_id)?|secret|password|"
            r"passwd|token|api_key|private_key|credentials?)[\"']?\s*:\s*\S"
        ),
        "a literal credential key (give an environment variable NAME in storage.key_env/secret_env)",
    ),
)
_TOKEN = re.compile(r"[A-Za-z0-9/+=_-]{32,}")


def _entropy(text: str) -> float:
    counts = {c: text.count(c) for c in set(text)}
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _looks_random(token: str) -> bool:
    """A long mixed-case-and-digit, high-entropy token: an AWS secret key (40 chars), an API token.
    Paths and names are lower-case words or separators and stay below the entropy bar."""
    has_classes = (
        any(c.islower() for c in token)
        and any(c.isupper() for c in token)
        and any(c.isdigit() for c in token)
    )
    return has_classes and _entropy(token) >= 4.2


def secret_findings(text: str) -> list[str]:
    """`"line N: <what>"` for every place in `text` that looks like a secret value."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, what in _SECRET_PATTERNS:
            if pattern.search(line):
                found.append(f"line {number}: looks like {what}")
        if any(_looks_random(t) for t in _TOKEN.findall(line)):
            found.append(f"line {number}: looks like a secret key or token (long random string)")
    return found


def _check_storage(where: str, storage: StorageConfig) -> None:
    for attr in ("key_env", "secret_env"):
        name = getattr(storage, attr)
        if name is not None and not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{where}.storage.{attr} must be an environment variable NAME, not a value")
    if (storage.key_env is None) != (storage.secret_env is None):
        raise ValueError(f"{where}.storage: give both key_env and secret_env, or neither")
    if storage.profile is not None and not re.fullmatch(r"[A-Za-z0-9_.@+=,-]+", storage.profile):
        raise ValueError(f"{where}.storage.profile must be a profile name")


def _check_uri(where: str, site: SiteSpec) -> None:
    import fsspec

    scheme, sep, rest = site.uri.partition("://")
    if not sep:
        if dataclasses.astuple(site.storage) != dataclasses.astuple(StorageConfig()):
            raise ValueError(
                f"{where}: storage settings are for object storage, but uri {site.uri!r} has no scheme "
                "(s3://bucket/prefix?)"
            )
        return
    if scheme not in fsspec.available_protocols():
        raise ValueError(f"{where}: uri {site.uri!r}: no file system knows the scheme {scheme!r}")
    if not rest.strip("/"):
        raise ValueError(f"{where}: uri {site.uri!r} names no bucket or folder")


def check_sites(sites: tuple[SiteSpec, ...]) -> None:
    """Raise ValueError naming the site and field of the first problem in `sites`."""
    if not sites:
        raise ValueError("no sites listed")
    names = [s.name for s in sites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"site names must be unique: {duplicates}")
    for site in sites:
        where = f"site {site.name!r}"
        if not _NAME.fullmatch(site.name):
            raise ValueError(f"{where}: name may use letters, digits, '_', '.', '-'")
        if not site.uri:
            raise ValueError(f"{where}: uri is empty")
        _check_uri(where, site)
        if not (math.isfinite(site.weight) and site.weight >= 0):
            raise ValueError(f"{where}: weight must be a finite number >= 0, got {site.weight}")
        if site.resource is not None and (
            not _RESOURCE.fullmatch(site.resource) or site.resource in _RESERVED_RESOURCES
        ):
            raise ValueError(f"{where}: resource {site.resource!r} must be a custom Ray resource name")
        _check_storage(where, site.storage)
    if not any(s.weight > 0 for s in sites):
        raise ValueError("every site has weight 0: nothing to sample")


@dataclass(frozen=True)
class SitesConfig:
    """Root of a sites file.

    Args:
        sites: the stores, in the order the data path numbers them (the `site` column of rows).
    """

    sites: tuple[SiteSpec, ...] = ()

    def __post_init__(self) -> None:
        check_sites(self.sites)


def load_sites(path: str | Path) -> tuple[SiteSpec, ...]:
    """The `SiteSpec`s of a sites file, checked; `ConfigError` naming the file and the reason.

    The file is a mapping with a `sites:` list (the `configs/` convention); a bare list of sites
    (the older `--sites` format of the pretraining jobs) is accepted too.
    """
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise config_lib.ConfigError(f"cannot read sites file {path}: {err}") from err
    findings = secret_findings(text)
    if findings:
        raise config_lib.ConfigError(
            f"sites file {path} seems to contain secret values ({'; '.join(findings)}); a sites file "
            "names where credentials live (storage.profile, storage.key_env/secret_env, an instance "
            "role), never the credentials themselves"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise config_lib.ConfigError(f"sites file {path}: not valid YAML: {err}") from err
    if isinstance(data, list):
        data = {"sites": data}
    if not isinstance(data, dict):
        raise config_lib.ConfigError(f"sites file {path}: expected a mapping with a 'sites:' list")
    try:
        return config_lib.build(SitesConfig, data).sites
    except config_lib.ConfigError as err:
        raise config_lib.ConfigError(f"sites file {path}: {err}") from err


def job_sites(stores: Sequence[str] = (), sites_file: str | Path | None = None) -> tuple[SiteSpec, ...]:
    """The sites of a job's command line: `--stores NAME=URI ...` (credentials from the
    environment) then the entries of `--sites FILE`, checked together (`check_sites`: unique names,
    URIs with a known scheme, ...); `ValueError` naming the item and the reason. Every job names
    its sites this way. Nothing given: no sites (a recipe may list its own)."""
    sites = []
    for item in stores:
        name, sep, uri = item.partition("=")
        if not sep or not name or "://" in name:
            raise ValueError(f"--stores {item!r}: expected NAME=URI (e.g. A=s3://bucket/siteA)")
        sites.append(SiteSpec(name=name, uri=uri))
    if sites_file:
        sites += load_sites(sites_file)
    if sites:
        check_sites(tuple(sites))
    return tuple(dataclasses.replace(s, uri=absolute(s.uri)) for s in sites)  # local: from here


# -- keeping reads on the site's nodes ------------------------------------------------------------
def remote_args(site: SiteSpec) -> dict[str, Any]:
    """Ray options (tasks, actors, `map_batches(..., **remote_args(site))`) that schedule work
    reading `site` only on nodes carrying its resource; empty for an unrestricted site."""
    return {"resources": {site.resource: SITE_RESOURCE_UNIT}} if site.resource else {}


def run_on_site(site: SiteSpec, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` where `site` may be read: here for an unrestricted site, else in a Ray task on
    one of the site's nodes (no CPU reserved: it is a short I/O call that must not wait behind the
    readers holding the node's CPUs), outside any placement group of the caller (a Tune trial's
    group holds another site's resource)."""
    if not site.resource:
        return fn(*args)
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(fn).options(num_cpus=0, max_retries=2, scheduling_strategy=outside, **remote_args(site))
    return ray.get(task.remote(*args))


def _scan_ids(site: SiteSpec, split: str, series: str = "all") -> tuple[str, ...]:
    from fmct_ray.ingest.store import SiteStore

    manifest = SiteStore(site.uri, site.storage).manifest()
    if split != "all":
        manifest = manifest[manifest["split"] == split]
    if series == "primary" and "primary" in manifest.columns:  # stores without studies: all primary
        manifest = manifest[manifest["primary"].astype(bool)]
    return tuple(sorted(manifest["scan_id"].astype(str)))


def site_scan_ids(site: SiteSpec, split: str = "all", series: str = "all") -> tuple[str, ...]:
    """Sorted scan ids of `split` in the site's manifest (every series, or only each study's
    primary one), read on the site's nodes.

    Only the ids leave the site (what `fmct_ray.data.source.make_plan` needs), not the manifest.
    """
    return run_on_site(site, _scan_ids, site, split, series)
