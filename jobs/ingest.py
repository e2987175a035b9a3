"""Ingest one site's NIfTI/DICOM scans into its Zarr store.

python jobs/ingest.py --site NAME --input PATH_OR_URI --output STORE_URI [--config F] [--set k=v]
ray job submit --working-dir . -- python jobs/ingest.py ...
"""

import json

import ray

from fmct_ray.cli import load_config, parser
from fmct_ray.ingest.pipeline import IngestConfig, StorageError, run_ingest


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--site", required=True, help="site name, stored in every manifest row")
    p.add_argument("--input", required=True, help="folder or s3:// prefix with NIfTI files and DICOM series")
    p.add_argument("--output", required=True, help="store: local folder or s3://bucket/prefix")
    args = p.parse_args()
    cfg = load_config(IngestConfig, args)
    ray.init(log_to_driver=True)  # the cluster of `ray job submit`, or a local one
    try:
        summary = run_ingest(args.site, args.input, args.output, cfg)
    except (ValueError, StorageError) as err:  # bad settings, or storage that failed: named
        raise SystemExit(f"ingest: {err}") from None
    print("ingest summary:", json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
