"""Pretrain a 3D ViT with MAE on one or several site stores (Ray Train, streaming Ray Data).

    ray job submit --working-dir . -- python jobs/pretrain_mae.py \
        --config configs/pretrain/<recipe>.yaml --stores A=s3://bucket/siteA B=/data/siteB \
        --num-workers 4 --gpu --storage s3://bucket/runs --name my-run [--set train.epochs=300]

The same --name and --storage resume the run from its latest checkpoint.
"""

from fmct_ray.train.launch import run_job

if __name__ == "__main__":
    run_job("mae", __doc__)
