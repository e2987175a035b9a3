"""Object storage: the obstore read path of `s3://` stores against the loopback S3 server, with
credentials given each way a site can give them, and the bucket-region lookup."""

import numpy as np
import pytest

from fmct_ray.ingest.store import SiteStore
from fmct_ray.storage import BotocoreCredentials, StorageConfig, bucket_region
from fmct_ray.synthetic import write_store


@pytest.fixture(scope="module")
def s3_store(s3, tmp_path_factory):
    """One synthetic scan in a local store and the same scan in s3://creds/site."""
    s3.filesystem().mkdir("creds")
    local = str(tmp_path_factory.mktemp("local") / "site")
    ids = list(write_store(local, 1, site="S")["scan_id"])
    write_store("s3://creds/site", 1, site="S", storage=StorageConfig(endpoint_url=s3.endpoint))
    return ids[0], SiteStore(local).read_volume(ids[0])


def test_s3_reads_with_credentials_from_named_env_vars_or_a_profile(s3, s3_store, tmp_path, monkeypatch):
    scan, expected = s3_store
    monkeypatch.setenv("SITE_KEY", "site-key")
    monkeypatch.setenv("SITE_SECRET", "site-secret")
    named = StorageConfig(endpoint_url=s3.endpoint, key_env="SITE_KEY", secret_env="SITE_SECRET")
    assert np.array_equal(SiteStore("s3://creds/site", named).read_volume(scan), expected)

    # a profile of a shared credentials file, with no keys in the environment (botocore's chain)
    (tmp_path / "credentials").write_text(
        "[site-a]\naws_access_key_id = profile-key\naws_secret_access_key = profile-secret\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never look beyond loopback
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert BotocoreCredentials("site-a")()["access_key_id"] == "profile-key"
    profile = StorageConfig(endpoint_url=s3.endpoint, profile="site-a")
    assert np.array_equal(SiteStore("s3://creds/site", profile).read_volume(scan), expected)
    with pytest.raises(PermissionError, match="no AWS credentials"):
        BotocoreCredentials()()


def test_missing_volume_on_s3_names_the_store_and_scan(s3, s3_store):
    store = SiteStore("s3://creds/site", StorageConfig(endpoint_url=s3.endpoint))
    with pytest.raises(FileNotFoundError, match="s3://creds/site: no stored volume nope"):
        store.read_volume("nope")


def test_bucket_region_is_looked_up(s3, s3_store):
    s3.filesystem().mkdir("in-ireland", region_name="eu-west-1")
    assert bucket_region("in-ireland", endpoint_url=s3.endpoint) == "eu-west-1"
    assert bucket_region("creds", endpoint_url=s3.endpoint) == "us-east-1"
