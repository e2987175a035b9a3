"""Federated averaging for sites whose scans may not leave their nodes (fmct_ray.train.federated).

    ray job submit --working-dir . -- python jobs/pretrain_federated.py \
        --config configs/pretrain/<recipe>.yaml --sites configs/sites/<sites>.yaml \
        --rounds 50 --local-steps 100 --storage s3://bucket/runs --name my-fed-run [--set train.seed=1]

Each site trains on its own nodes (its `resource` in the sites file); only weights travel, averaged
by site size each round. The same --name and --storage resume from the latest round.
"""

from fmct_ray.train.federated import FederatedConfig, run_federated
from fmct_ray.train.launch import job_parser, recipe_from_args

if __name__ == "__main__":
    p = job_parser(__doc__)
    p.add_argument("--rounds", type=int, required=True, help="averaging rounds")
    p.add_argument("--local-steps", type=int, required=True, help="optimiser steps per site per round")
    p.add_argument("--stop-after", type=int, help="end this invocation after this many rounds (resumable)")
    p.add_argument("--gpus-per-site", type=float, default=0.0)
    args = p.parse_args()
    cfg = recipe_from_args(args)
    fed = FederatedConfig(
        rounds=args.rounds,
        local_steps=args.local_steps,
        stop_after=args.stop_after,
        cpus_per_site=args.cpus_per_worker,
        gpus_per_site=args.gpus_per_site,
        keep_checkpoints=cfg.train.keep_checkpoints,
    )
    state = run_federated(cfg, fed, cfg.data.sites, args.storage, args.name)
    print("federated run at round", state and state["round"], "of", fed.rounds)
