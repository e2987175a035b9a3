"""CPU cost of reading one stored volume from S3: s3fs against obstore, in one process.

Against the loopback S3 server (moto_server, started here), for synthetic 224^3 volumes
(blosc-lz4, about 1.8 MB per chunk), median over `--reads` reads after a warm-up:

  reader CPU   `time.process_time` of this process per read (what a reader actor core pays)
  server CPU   the moto process's user + system time per read, the mean over all reads (its
               clock ticks are 10 ms); a real object store pays this, not the reader
  wall         per read, one at a time

for the volume's chunk GET and its metadata GET through s3fs (`fs.cat`) and through obstore, and
for a whole `SiteStore.read_volume` (both GETs + decode) through each client, from a local store
for reference.

    python bench/bench_s3_read.py [--reads 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import psutil

from fmct_ray.ingest.store import SiteStore, _decode_single_chunk
from fmct_ray.storage import StorageConfig
from fmct_ray.synthetic import write_store
from fmct_ray.testing import S3Server


def timed(fn, reads: int, server: psutil.Process | None) -> dict:
    fn(0)
    server_cpu = (lambda: sum(server.cpu_times()[:2])) if server else (lambda: 0.0)
    cpu, wall, s0 = [], [], server_cpu()
    for i in range(reads):
        c0, w0 = time.process_time(), time.perf_counter()
        fn(i)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    ms = lambda xs: round(1000 * sorted(xs)[len(xs) // 2], 2)  # noqa: E731
    server_ms = round(1000 * (server_cpu() - s0) / reads, 2)
    return {"reader_cpu_ms": ms(cpu), "server_cpu_ms": server_ms, "wall_ms": ms(wall)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reads", type=int, default=40)
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args()
    n, out = args.volumes, {}
    with S3Server() as s3:
        os.environ.update(s3.env())
        local = str(Path(tempfile.mkdtemp(prefix="bench_s3_read_")) / "L")
        ids = list(write_store(local, n, site="V")["scan_id"])
        s3.filesystem().mkdir("bench")
        storage = StorageConfig(endpoint_url=s3.endpoint)
        write_store("s3://bench/V", n, site="V", storage=storage)
        server = psutil.Process(s3.proc.pid)
        store, fs = SiteStore("s3://bench/V", storage), SiteStore("s3://bench/V", storage).fs
        store._get([f"bench/V/volumes/{ids[0]}/zarr.json"])  # the obstore client
        key = "bench/V/volumes/{}/{}"

        def s3fs_volume(i: int):
            meta, chunk = (fs.cat(key.format(ids[i % n], f)) for f in ("zarr.json", "c/0/0/0"))
            return _decode_single_chunk(json.loads(meta), chunk)

        cases = {
            "chunk GET, s3fs": lambda i: fs.cat(key.format(ids[i % n], "c/0/0/0")),
            "chunk GET, obstore": lambda i: store._get([key.format(ids[i % n], "c/0/0/0")]),
            "metadata GET, s3fs": lambda i: fs.cat(key.format(ids[i % n], "zarr.json")),
            "metadata GET, obstore": lambda i: store._get([key.format(ids[i % n], "zarr.json")]),
            "read_volume, s3fs": s3fs_volume,
            "read_volume, obstore": lambda i: store.read_volume(ids[i % n]),
        }
        for name, fn in cases.items():
            out[name] = timed(fn, args.reads, server)
            print(f"{name:24s} {out[name]}", flush=True)
        local_store = SiteStore(local)
        out["read_volume, local"] = timed(lambda i: local_store.read_volume(ids[i % n]), args.reads, None)
        print(f"{'read_volume, local':24s} {out['read_volume, local']}")
    a, b = out["read_volume, s3fs"], out["read_volume, obstore"]
    both = (a["reader_cpu_ms"] + a["server_cpu_ms"]) / (b["reader_cpu_ms"] + b["server_cpu_ms"])
    print(
        f"\nread_volume from S3, s3fs / obstore: reader CPU {a['reader_cpu_ms'] / b['reader_cpu_ms']:.2f}x, "
        f"reader + server CPU {both:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
