"""The Ray Data source: epoch orders (unit), single-GET reads, worker-independent crops, and the
streaming dataset under a 2-CPU Ray (module-scoped)."""

import numpy as np
import pytest

from fmct_ray.data.crops import MultiCropConfig
from fmct_ray.data.sampling import Shard, epoch_order, site_counts
from fmct_ray.data.source import DataConfig, VolumeReader, build_dataset, make_plan
from fmct_ray.ingest.store import SiteStore
from fmct_ray.sites import SiteSpec
from fmct_ray.storage import StorageConfig
from fmct_ray.synthetic import write_store

CROPS = MultiCropConfig(global_size=16, n_local=2, local_box=(32, 64), local_size=8)


def test_write_store_is_the_same_with_one_or_two_threads(tmp_path):
    one = write_store(str(tmp_path / "one"), 3, site="T", seed=5, splits=("train", "test"), threads=1)
    two = write_store(str(tmp_path / "two"), 3, site="T", seed=5, splits=("train", "test"), threads=2)
    assert one.equals(two) and list(one["split"]) == ["train", "test", "train"]
    sums = [list(SiteStore(str(tmp_path / d)).manifest()["checksum"]) for d in ("one", "two")]
    assert sums[0] == sums[1] and len(set(sums[0])) == 3


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    a = write_store(str(root / "A"), 6, site="A", splits=("train", "train", "val"))
    b = write_store(str(root / "B"), 2, site="B", seed=1)
    return root, list(a["scan_id"]), list(b["scan_id"])


def test_equal_weights_give_every_scan_once_per_epoch():
    order = epoch_order([5, 3], [1.0, 1.0], 8, seed=3, epoch=0)
    assert sorted(map(tuple, order)) == [(0, i) for i in range(5)] + [(1, i) for i in range(3)]


def test_order_is_reproducible_and_fresh_every_epoch():
    a = epoch_order([50], [1.0], 50, seed=1, epoch=0)
    assert np.array_equal(a, epoch_order([50], [1.0], 50, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order([50], [1.0], 50, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order([50], [1.0], 50, seed=2, epoch=0))


def test_site_weights_set_each_sites_share():
    assert site_counts([10, 10], [3.0, 1.0], 40).tolist() == [30, 10]
    order = epoch_order([10, 10], [3.0, 1.0], 40, seed=0, epoch=0)
    site0 = order[order[:, 0] == 0, 1]
    assert len(site0) == 30 and np.bincount(site0).min() == 3  # cycles without replacement
    with pytest.raises(ValueError):
        site_counts([0, 0], [1.0, 1.0], 4)


def test_plan_selects_the_split(stores):
    root, a, b = stores
    sites = (SiteSpec("A", str(root / "A")), SiteSpec("B", str(root / "B")))
    plan = make_plan(DataConfig(sites=sites, split="val"))
    assert plan.scan_ids == (tuple(sorted(a[2::3])), ()) and plan.samples_per_epoch == 2
    assert set(plan.order(0)[:, 0]) == {0}  # a site without scans of the split is never drawn
    assert make_plan(DataConfig(sites=sites)).samples_per_epoch == 4 + 2


def _reader(root, shard=None):
    plan = make_plan(DataConfig(sites=(SiteSpec("A", str(root / "A")),)))
    return VolumeReader(plan, CROPS, shard or Shard())


def _zarr_read(uri: str, scan_id: str) -> np.ndarray:
    import zarr

    return zarr.open_array(SiteStore(uri)._zarr_store(read_only=True), path=f"volumes/{scan_id}")[...]


def test_fast_read_matches_zarr(stores):
    root, a, _ = stores
    assert np.array_equal(_reader(root).read(0, a[1]), _zarr_read(str(root / "A"), a[1]))


def test_crops_depend_on_the_sample_not_on_the_batch(stores):
    root, _, _ = stores
    whole = _reader(root)({"id": np.arange(4)})
    alone = _reader(root, Shard(start=0, rank=1, world=2, per_rank=2))({"id": np.array([0])})
    assert whole["global"].dtype == np.int16 and whole["global"].shape == (4, 2, 16, 16, 16)
    assert whole["local"].shape == (4, 2, 8, 8, 8)
    assert alone["index"].tolist() == [2]
    assert np.array_equal(whole["global"][2], alone["global"][0])
    assert np.array_equal(whole["local"][2], alone["local"][0])
    assert not np.array_equal(whole["global"][0], whole["global"][1])
    assert not {k for k, v in whole.items() if v.dtype.kind not in "iu"}  # no string columns


def test_fast_read_from_s3(s3, stores):
    root, _, _ = stores
    s3.filesystem().mkdir("bucket")
    written = write_store("s3://bucket/siteS", 1, site="S", storage=StorageConfig(endpoint_url=s3.endpoint))
    ids = list(written["scan_id"])
    site = SiteSpec("S", "s3://bucket/siteS", StorageConfig(endpoint_url=s3.endpoint))
    plan = make_plan(DataConfig(sites=(site,)))
    reader = VolumeReader(plan, CROPS)
    assert np.array_equal(reader.read(0, ids[0]), _zarr_read("s3://bucket/siteS", ids[0]))


@pytest.fixture(scope="module")
def ray2():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_streaming_dataset_over_two_sites(ray2, stores):
    root, _, _ = stores
    cfg = DataConfig(
        sites=(SiteSpec("A", str(root / "A")), SiteSpec("B", str(root / "B"))),
        crops=CROPS,
        readers=1,
        cpus_per_reader=0.5,
        volumes_per_task=1,
        samples_per_epoch=6,
        preserve_order=True,
    )
    from ray.data import DataContext

    ds = build_dataset(cfg, total_samples=15, shard=Shard(start=3))
    # the order is the dataset's own setting: the process's DataContext is left as it was
    assert ds.context.execution_options.preserve_order
    assert not DataContext.get_current().execution_options.preserve_order
    batches = list(ds.iter_torch_batches(batch_size=4, drop_last=False))
    index = np.concatenate([b["index"].numpy() for b in batches])
    assert index.tolist() == list(range(3, 15))
    sites = np.concatenate([b["site"].numpy() for b in batches])
    plan = make_plan(cfg)
    assert sites.tolist() == plan.locate(index)[:, 0].tolist()
    assert batches[0]["global"].dtype.is_floating_point is False
