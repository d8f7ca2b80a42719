"""`ray job submit` entrypoint for a growth-ratio sweep (`ray-sebs tune`) with Ray Tune.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/tune_growth.py \
        --ratios 1,1.5,2,4 --schedules sebs,ssgd --seeds 3 --storage-path s3://... --name growth

Inside a job, Ray sets RAY_ADDRESS, so the sweep joins the cluster the job runs on; every flag is
`ray-sebs tune`'s (see `ray-sebs tune --help`). Submitting again with the same --name resumes the
sweep: finished trials are kept.
"""

import sys

from ray_sebs.cli import run

if __name__ == "__main__":
    run(["tune", *sys.argv[1:]])
