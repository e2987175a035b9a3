"""Ingest one site's NIfTI/DICOM scans into its Zarr store.

python jobs/ingest.py --site NAME --input PATH_OR_URI --output STORE_URI [--config F] [--set k=v]
ray job submit --working-dir . -- python jobs/ingest.py ...
"""

import json

from fmct_ray.cli import load_config, parser
from fmct_ray.ingest.pipeline import IngestConfig, run_ingest


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--site", required=True, help="site name, stored in every manifest row")
    p.add_argument("--input", required=True, help="folder or s3:// prefix with NIfTI files and DICOM series")
    p.add_argument("--output", required=True, help="store: local folder or s3://bucket/prefix")
    args = p.parse_args()
    summary = run_ingest(args.site, args.input, args.output, load_config(IngestConfig, args))
    print("ingest summary:", json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
