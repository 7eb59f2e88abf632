"""Per-rank code for the slow tests of tests/test_scale.py, launched as

    torchrun --standalone --nproc_per_node=N tests/scale_helpers.py load MODEL_DIR OUT_DIR [shard]

Loads MODEL_DIR with runtime.load_model (trainable, float32; shard=True when the 4th argument is "shard") and
writes OUT_DIR/load.rank{R}.json: the host-memory peak of the load in bytes (VmHWM after resetting it just
before the load, minus VmRSS then) and, on rank 0, OUT_DIR/load.safetensors: the full weights
(runtime.full_state_dict, all-gathered), for the test to compare with a plain load.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch
from safetensors.torch import save_file

from bench import proc_status_bytes, reset_peak_memory
from runtime import full_state_dict, init_distributed, load_model, run_main, shutdown_distributed


def main():
    scenario, model_dir, out = sys.argv[1:4]
    shard = len(sys.argv) > 4 and sys.argv[4] == "shard"
    assert scenario == "load"
    d = init_distributed("cpu")
    reset_peak_memory(torch.device("cpu"))  # VmHWM back to the current RSS
    before = proc_status_bytes("VmRSS")
    model = load_model(model_dir, "policy", d, trainable=True, shard=shard)
    peak = proc_status_bytes("VmHWM") - before
    with open(os.path.join(out, f"load.rank{d.rank}.json"), "w") as f:
        json.dump({"peak_bytes": peak, "world_size": d.world_size, "shard": shard}, f)
    state = full_state_dict(model)
    if d.is_main:
        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
                  os.path.join(out, "load.safetensors"))
    if d.distributed:
        torch.distributed.barrier()  # rank 1 must not tear down the group while rank 0 still writes
    shutdown_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_main(main)  # gloo's rare abort at exit on torch 2.13: runtime.run_main's docstring
