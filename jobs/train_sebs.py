"""`ray job submit` entrypoint for a SEBS training run.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/train_sebs.py --storage-path s3://...

Inside a job, Ray sets RAY_ADDRESS, so the run joins the cluster the job runs on; every flag is
`ray-sebs train`'s (see `ray-sebs train --help`).
"""

import sys

from ray_sebs.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
