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
        retries: how often a request that failed for a transient reason (connection refused or
            dropped, 5xx, throttling, timeouts) is retried, with exponential backoff and jitter,
            before the read or write fails (training reads: `StorageError` naming the store). 8:
            about half a minute of obstore's backoff (0.1 s doubling, at most 15 s) and a minute
            of botocore's (standard mode, at most 20 s apart).
    """

    endpoint_url: str | None = None
    profile: str | None = None
    key_env: str | None = None
    secret_env: str | None = None
    region: str | None = None
    anon: bool = False
    retries: int = 8


class StorageError(RuntimeError):
    """A store or an input could not be read or written for a reason that is not the data's (an
    outage that outlasted the retries, refused credentials, a full disk). Ingest stops instead of
    quarantining good scans; a training reader fails its worker group, which `FailureConfig`
    restarts from the last checkpoint."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute, URIs unchanged: Ray workers and Tune trials run in folders of
    their own, where a path relative to the job's folder names nothing."""
    return uri if "://" in uri else os.path.abspath(uri)


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
    opts["config_kwargs"] = {"retries": {"mode": "standard", "max_attempts": cfg.retries + 1}}
    return opts


def option_retries(options: dict[str, Any]) -> int:
    """The `StorageConfig.retries` that resolved `options` (`storage_options`) carry."""
    return (
        options.get("config_kwargs", {}).get("retries", {}).get("max_attempts", 1 + StorageConfig.retries) - 1
    )


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


class S3Objects:
    """Whole-object GETs from one S3 bucket through obstore's Rust client: the training read path.

    s3fs (aiobotocore) spends about 5 ms of CPU in the reader per 1.8 MB volume GET and the same
    again per metadata GET; obstore about 1.6 and 0.3 ms (`bench/bench_s3_read.py`), which is what
    lets a reader core keep up with object storage. Everything else (listing, writes, manifests)
    stays on fsspec. Credentials come from the same places as for s3fs: the resolved `options`,
    else botocore's chain (environment, shared files and profiles, SSO, instance roles).

    Args:
        bucket: the bucket.
        options: resolved s3fs options (`storage_options`; obstore retries as often as botocore).
    """

    def __init__(self, bucket: str, options: dict[str, Any]) -> None:
        from datetime import timedelta

        from obstore.store import S3Store

        endpoint = options.get("endpoint_url")
        config: dict[str, Any] = {"endpoint": endpoint} if endpoint else {}
        provider = None
        if options.get("anon"):
            config["skip_signature"] = True
        elif "key" in options:
            config.update(access_key_id=options["key"], secret_access_key=options["secret"])
        else:
            provider = BotocoreCredentials(options.get("profile"))
        region = options.get("client_kwargs", {}).get("region_name") or _env_region(options.get("profile"))
        if not region and not endpoint:  # AWS answers a wrong region with a redirect, not data
            region = bucket_region(bucket, options.get("profile"))
        if region:
            config["region"] = region
        self.store = S3Store(
            bucket,
            config=config,
            client_options={"allow_http": bool(endpoint and endpoint.startswith("http://"))},
            credential_provider=provider,
            retry_config={
                "max_retries": option_retries(options),
                "backoff": {
                    "init_backoff": timedelta(seconds=0.1),
                    "max_backoff": timedelta(seconds=15),
                    "base": 2,
                },
                "retry_timeout": timedelta(minutes=10),  # the count bounds it
            },
        )

    def get(self, path: str):
        """The object at `path` ("bucket/key", as fsspec paths are) as a bytes-like buffer (no copy);
        FileNotFoundError if absent."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return obstore.get(self.store, path.split("/", 1)[1]).bytes()
        except NotFoundError as err:
            raise FileNotFoundError(f"s3://{path}") from err


class BotocoreCredentials:
    """obstore credential provider resolved by botocore, exactly as s3fs resolves them."""

    def __init__(self, profile: str | None = None) -> None:
        import botocore.session

        self.session = botocore.session.Session(profile=profile)

    def __call__(self) -> dict[str, Any]:
        from datetime import UTC, datetime, timedelta

        creds = self.session.get_credentials()
        if creds is None:
            raise PermissionError("no AWS credentials: set key_env/secret_env, a profile, or anon")
        frozen = creds.get_frozen_credentials()  # refreshes expiring credentials first
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(UTC) + timedelta(minutes=5),
        }


def _env_region(profile: str | None) -> str | None:
    import botocore.session

    return botocore.session.Session(profile=profile).get_config_variable("region")


def bucket_region(bucket: str, profile: str | None = None, endpoint_url: str | None = None) -> str | None:
    """The region AWS keeps `bucket` in (the x-amz-bucket-region header of HEAD bucket)."""
    import botocore.exceptions
    import botocore.session

    client = botocore.session.Session(profile=profile).create_client("s3", endpoint_url=endpoint_url)
    try:
        meta = client.head_bucket(Bucket=bucket)["ResponseMetadata"]
    except botocore.exceptions.ClientError as err:  # 301/403 still name the region
        meta = err.response.get("ResponseMetadata", {})
    return meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")


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
