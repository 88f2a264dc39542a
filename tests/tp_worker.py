"""One process of a two-process tensor-parallel run (test_parallel.py starts two): jax.distributed over CPU
collectives, one CPU device each, the model split over both. Process 0 generates (two batches, idle between them)
and writes the tokens as JSON; process 1 follows its steps.

    python tests/tp_worker.py CHECKPOINT PORT PROCESS_ID OUT_JSON
"""

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # one device per process

import qwen3_jax as q  # noqa: E402
from qwen3_jax import distributed  # noqa: E402

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, block_size=16, num_blocks=24,
              decode_steps=4, precompile=False)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12] * 3, [40, 41, 42], [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [99, 98]]
PARAMS = [q.SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
          q.SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=7, ignore_eos=True),
          q.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]


def main(ckpt: str, port: str, process_id: str, out: str) -> None:
    distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
    llm = q.LLM(ckpt, dtype="float32", kernels="reference", tensor_parallel=2, **ENGINE)
    if not distributed.is_leader():
        llm.follow()
        return
    outs = llm.generate(PROMPTS[:2], PARAMS[:2], use_tqdm=False)
    time.sleep(1.5)  # idle: process 1 waits for the next step
    outs += llm.generate(PROMPTS[2:], PARAMS[2:], use_tqdm=False)
    llm.shutdown()
    devices = sorted({s.device.process_index for s in llm.model.params["norm"].global_shards})
    with open(out, "w") as f:
        json.dump({"tokens": [o.outputs[0].token_ids for o in outs], "processes": devices}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
