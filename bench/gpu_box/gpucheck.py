"""On a GPU node: which device TextEncoder picks in Ray actors with num_gpus 0 and 0.5."""

import os

os.environ["RAY_AUTH_MODE"] = "disabled"
from pathlib import Path

import ray


@ray.remote
class Probe:
    def device(self):
        from app.adapters.encoder import TextEncoder

        enc = TextEncoder(Path("/tmp/minilm-random"), threads=1)
        return {
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(enc.device),
            "gpu_ids": ray.get_gpu_ids(),
        }


ray.init(
    address="local",
    num_cpus=2,
    num_gpus=1,
    include_dashboard=False,
    runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "RAY_AUTH_MODE": "disabled"}},
)
for g in (0, 0.5):
    print("num_gpus", g, ray.get(Probe.options(num_gpus=g).remote().device.remote()), flush=True)
ray.shutdown()
