"""Local paths and `s3://` URIs behind one fsspec interface, with credentials kept out of configs.

A `StorageConfig` names *where* credentials live (environment variable names, an AWS profile),
never the secrets, so resolved configs can be written next to every run. Each site's store can
carry its own `StorageConfig` (federated-style: sites keep their own buckets and credentials).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec


@dataclass(frozen=True)
class StorageConfig:
    """How to reach a store or an input tree.

    Args:
        endpoint_url: S3-compatible endpoint (None: AWS, or `$AWS_ENDPOINT_URL` when set).
        profile: AWS profile name from the shared credentials file.
        key_env: name of the environment variable holding the access key id.
        secret_env: name of the environment variable holding the secret access key.
        region: bucket region, when the endpoint needs one.
        anon: anonymous access (public buckets).
    """

    endpoint_url: str | None = None
    profile: str | None = None
    key_env: str | None = None
    secret_env: str | None = None
    region: str | None = None
    anon: bool = False


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def storage_options(cfg: StorageConfig | None) -> dict[str, Any]:
    """fsspec/s3fs keyword arguments for `cfg`, resolving secrets from the environment now."""
    cfg = cfg or StorageConfig()
    opts: dict[str, Any] = {}
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if cfg.profile:
        opts["profile"] = cfg.profile
    for field, name in (("key", cfg.key_env), ("secret", cfg.secret_env)):
        if name:
            if name not in os.environ:
                raise KeyError(f"storage credentials: environment variable {name} is not set")
            opts[field] = os.environ[name]
    if cfg.region:
        opts["client_kwargs"] = {"region_name": cfg.region}
    if cfg.anon:
        opts["anon"] = True
    return opts


def filesystem(
    uri: str, cfg: StorageConfig | None = None, options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `uri` and the path within it (no protocol).

    `options` (already resolved, e.g. passed to a Ray worker) take the place of `cfg`.
    """
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(uri.removeprefix("file://"))
    protocol, path = uri.split("://", 1)
    if options is None:
        options = storage_options(cfg) if protocol in ("s3", "s3a") else {}
    # One instance per (protocol, options) is cached by fsspec; fine inside long-lived workers.
    return fsspec.filesystem(protocol, **options), path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see either nothing or all of it.

    Object stores make a single PUT atomic; on a local filesystem we write a temporary file in
    the same folder and rename it over the target.
    """
    if is_local(fs):
        parent = posixpath.dirname(path)
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)
