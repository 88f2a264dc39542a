"""Tensor parallelism (`parallel.py`) on CPU meshes of 2, 4 and 8 devices (conftest makes eight): f32 logits and
greedy tokens equal to one device's, through loading slices of the checkpoint, the forward pass, and the engine with
continuous batching and prefix hits; each device holding only its part; the donated pool still aliased; bad
configurations refused."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen3_jax as q
from qwen3_jax.kv_cache import AttentionMetadata, KVCache
from qwen3_jax.parallel import kv_heads_of
from tiny_checkpoint import build_checkpoint

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, block_size=16, num_blocks=24,
              decode_steps=4, precompile=False)
# (name, build_checkpoint arguments): KV heads fewer than the devices (2 < 4, 8, replicated) with a vocabulary
# that 4 and 8 do not divide (padded), and tied embeddings with KV heads split evenly up to 4.
CONFIGS = {
    "kv2-untied": dict(vocab_size=509, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                       intermediate_size=128, tie_word_embeddings=False, seed=3),
    "kv4-tied": dict(vocab_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                     intermediate_size=96, tie_word_embeddings=True, seed=4, max_shard_size="40KB"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ckpt(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run_forward(model, tokens, num_blocks=8, block_size=16):
    """Prefill `tokens` then decode two tokens through the jitted forward pass -> the three steps' logits."""
    config, tp = model.config, model.parallel
    cache = (tp.init_cache(config, num_blocks, block_size) if tp is not None
             else KVCache.init(config, num_blocks, block_size))
    table = [list(range(num_blocks))]

    @jax.jit
    def step(params, cache, tokens, positions, meta):
        kw = dict(config=config, kernels=model.kernels)
        if tp is None:
            return q.forward(params, tokens, positions, cache, meta, **kw)
        return tp.forward(params, tokens, positions, cache, meta, **kw)

    n = len(tokens)
    meta = AttentionMetadata.for_prefill(table, [n], [n], block_size=block_size, num_tokens=n)
    logits, cache = step(model.params, cache, jnp.asarray(tokens), jnp.arange(n), meta)
    out = [logits]
    for t in range(2):
        meta = AttentionMetadata.for_decode(table, [n + t])
        nxt = jnp.argmax(out[-1][-1:], axis=-1).astype(jnp.int32)
        logits, cache = step(model.params, cache, nxt, jnp.asarray([n + t]), meta)
        out.append(logits)
    return [np.asarray(x) for x in out]


@pytest.fixture(scope="module")
def one_device(ckpt):
    return q.load(ckpt, dtype="float32", kernels="reference")


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_logits_equal_one_device(ckpt, one_device, size):
    model = q.load(ckpt, dtype="float32", kernels="reference", tensor_parallel=size)
    tokens = np.random.default_rng(size).integers(0, one_device.config.vocab_size, 37).tolist()
    want = run_forward(one_device, tokens)
    got = run_forward(model, tokens)
    for w, g in zip(want, got):
        assert g.shape == w.shape
        assert relative_error(g, w) < 1e-6
        np.testing.assert_array_equal(g.argmax(-1), w.argmax(-1))


def test_pallas_kernels_run_per_device(ckpt, one_device):
    """The Pallas kernels (interpret mode here) on each device's local heads under shard_map."""
    model = q.load(ckpt, dtype="float32", kernels="pallas", tensor_parallel=2)
    tokens = np.random.default_rng(0).integers(0, one_device.config.vocab_size, 21).tolist()
    for w, g in zip(run_forward(one_device, tokens), run_forward(model, tokens)):
        assert relative_error(g, w) < 1e-5


def test_engine_tokens_equal_one_device(ckpt, one_device):
    """Continuous batching on 4 devices: requests arriving together and later, sharing a prefix (cache hits)."""
    rng = np.random.default_rng(1)
    vocab = one_device.config.vocab_size
    prefix = rng.integers(0, vocab, 40).tolist()
    prompts = [prefix + rng.integers(0, vocab, n).tolist() for n in (3, 11, 25)] + [rng.integers(0, vocab, 9).tolist()]
    params = [q.SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 5, 9, 14)]
    want = q.LLM(one_device, **ENGINE).generate(prompts, params, use_tqdm=False)
    llm = q.LLM(ckpt, dtype="float32", kernels="reference", tensor_parallel=4, **ENGINE)
    first = llm.generate(prompts[:1], params[:1], use_tqdm=False)  # its prefix blocks are cached for the rest
    got = llm.generate(prompts, params, use_tqdm=False)
    assert first[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(o.metrics.num_cached_tokens >= 32 for o in got[:3])  # two 16-position blocks of the shared prefix
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_sampling_is_identical_across_sizes(ckpt, one_device):
    """Seeded sampling on the gathered logits draws the same tokens on 2 devices as on one."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = q.SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=10, ignore_eos=True)
    want = q.LLM(one_device, **ENGINE).generate(prompts, params, use_tqdm=False)
    got = q.LLM(ckpt, dtype="float32", kernels="reference", tensor_parallel=2, **ENGINE).generate(
        prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_each_device_holds_only_its_part(ckpt, one_device):
    size = 4
    model = q.load(ckpt, dtype="float32", tensor_parallel=size)
    config = model.config
    d, hidden = config.head_dim, config.hidden_size
    q_rows = config.num_attention_heads // size * d
    kv_rows = max(config.num_key_value_heads // size, 1) * d  # a whole KV head where there are fewer than devices
    mlp = config.intermediate_size // size
    layer = model.params["layers"][0]
    want = {"qkv_proj": (q_rows + 2 * kv_rows, hidden), "o_proj": (hidden, q_rows),
            "gate_up_proj": (2 * mlp, hidden), "down_proj": (hidden, mlp), "input_layernorm": (hidden,)}
    for name, shape in want.items():
        shards = layer[name].addressable_shards
        assert len(shards) == size and {s.data.shape for s in shards} == {shape}, name
    vocab_rows = {s.data.shape for s in model.params["embed_tokens"].addressable_shards}
    assert vocab_rows == {(-(-config.vocab_size // size), config.hidden_size)}
    # every device's share of the weights: a quarter of the split ones, plus the replicated norms
    total = sum(x.nbytes for x in jax.tree.leaves(one_device.params))
    norms = sum(x.nbytes for x in jax.tree.leaves(one_device.params) if x.ndim == 1)
    per_device = {d: 0 for d in model.parallel.devices}
    for x in jax.tree.leaves(model.params):
        for s in x.addressable_shards:
            per_device[s.device] += s.data.nbytes
    padding = (-config.vocab_size) % size * config.hidden_size * 4 * (1 if config.tie_word_embeddings else 2)
    # with fewer KV heads than devices each device holds a whole KV head: more than its share of k and v
    replicas = (2 * kv_rows - 2 * config.kv_size / size) * hidden * 4 * config.num_hidden_layers
    for nbytes in per_device.values():
        assert nbytes == pytest.approx((total - norms + padding) / size + norms + replicas)
    # the KV pool: each device holds its KV heads of every block
    engine = q.LLM(model, **ENGINE).engine
    pool = engine.cache.k[0]
    assert {s.data.shape for s in pool.addressable_shards} == {
        (ENGINE["num_blocks"], kv_rows // d, ENGINE["block_size"], d)}


def test_donated_pool_is_aliased(ckpt):
    llm = q.LLM(ckpt, dtype="float32", kernels="reference", tensor_parallel=2, **ENGINE)
    engine = llm.engine
    engine.add_request(None, [1, 2, 3, 4, 5], q.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    before = engine.cache.k[0]
    pointers = [s.data.unsafe_buffer_pointer() for s in before.addressable_shards]
    while engine.has_unfinished_requests():
        engine.step()
    assert before.is_deleted()  # donated: the step wrote its keys into the same buffers
    assert [s.data.unsafe_buffer_pointer() for s in engine.cache.k[0].addressable_shards] == pointers
    assert engine.cache.k[0].sharding.is_equivalent_to(before.sharding, 4)


def test_command_line_splits_the_model(ckpt, capsys):
    """`qwen3-jax generate -tp 4` prints what the unsplit model prints."""
    from qwen3_jax import cli

    argv = ["generate", "--model", str(ckpt), "--kernels", "reference", "--dtype", "float32", "--greedy",
            "--prompt", "hello world", "--max-new-tokens", "6", "--no-compilation-cache", "--no-stream"]
    assert cli.main(argv) == 0
    want = capsys.readouterr().out
    assert cli.main(argv + ["-tp", "4"]) == 0
    assert capsys.readouterr().out == want and want.strip()


def test_replicated_kv_heads_rule():
    config = q.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    # 8 devices, 2 KV heads: devices 0-3 hold KV head 0, devices 4-7 KV head 1 (the one their query heads read)
    assert [list(kv_heads_of(config, 8, s)) for s in range(8)] == [[0]] * 4 + [[1]] * 4
    assert [list(kv_heads_of(config, 2, s)) for s in range(2)] == [[0], [1]]
    group = config.num_attention_heads // config.num_key_value_heads
    for size in (1, 2, 4, 8):
        heads = config.num_attention_heads // size
        for s in range(size):
            read = {h // group for h in range(s * heads, (s + 1) * heads)}
            assert read == set(kv_heads_of(config, size, s))


@pytest.mark.parametrize("overrides, size, message", [
    (dict(num_attention_heads=6, num_key_value_heads=2), 4, "does not divide num_attention_heads=6"),
    (dict(num_attention_heads=12, num_key_value_heads=6), 4, "num_key_value_heads=6"),
    (dict(intermediate_size=100), 8, "does not divide intermediate_size=100"),
    (dict(num_attention_heads=16), 16, "needs 16 devices, but JAX sees 8"),
    (dict(), 0, "tensor_parallel must be a positive integer"),
])
def test_bad_configurations_are_refused(tmp_path, overrides, size, message):
    ckpt = build_checkpoint(tmp_path, num_hidden_layers=1, **{**dict(num_attention_heads=8, head_dim=16), **overrides})
    with pytest.raises(ValueError, match=message):
        q.load(ckpt, tensor_parallel=size)


def test_bad_device_choices_are_refused(ckpt, one_device):
    with pytest.raises(ValueError, match="names a device twice"):
        q.load(ckpt, tensor_parallel=2, devices=[0, 0])
    with pytest.raises(ValueError, match="is not one of the devices"):
        q.load(ckpt, tensor_parallel=2, devices=[0, 99])
    with pytest.raises(ValueError, match="tensor_parallel=2 but devices lists 3"):
        q.load(ckpt, tensor_parallel=2, devices=[0, 1, 2])
    with pytest.raises(q.WeightsError, match="does not yet split quantized weights"):
        q.load(ckpt, tensor_parallel=2, quantize="int8")
    with pytest.raises(ValueError, match="already loaded"):
        q.LLM(one_device, tensor_parallel=2)


def test_chosen_devices_and_resharding(ckpt, one_device):
    model = q.load(ckpt, dtype="float32", devices=[6, 7])
    assert [d.id for d in model.parallel.devices] == [6, 7]
    assert {s.device.id for s in model.params["norm"].addressable_shards} == {6, 7}
    split = one_device.with_tensor_parallel(2)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(split.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_what_one_does(tmp_path):
    """jax.distributed with CPU collectives: two processes, one device each, the model split over both; process 0
    takes the prompts and process 1 follows its steps."""
    import tp_worker

    ckpt = build_checkpoint(tmp_path / "ckpt", **CONFIGS["kv2-untied"])
    port, out = _free_port(), tmp_path / "tokens.json"
    worker = Path(tp_worker.__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(worker), str(ckpt), str(port), str(i), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
    got = json.loads(out.read_text())
    assert got["processes"] == [0, 1]  # the params really lie on both processes' devices
    want = q.LLM(q.load(ckpt, dtype="float32", kernels="reference"), **tp_worker.ENGINE).generate(
        tp_worker.PROMPTS, tp_worker.PARAMS, use_tqdm=False)
    assert got["tokens"] == [o.outputs[0].token_ids for o in want]


@pytest.mark.gpu
def test_one_device_mesh_on_gpu_equals_unsplit(tmp_path):
    """TP = 1 through the sharded code path (shard_map, the compiled Pallas kernels) on the GPU: the same bf16
    tokens and f32 logits as the unsplit model."""
    ckpt = build_checkpoint(tmp_path, **{**CONFIGS["kv2-untied"], "head_dim": 64, "dtype": "bfloat16"})
    for dtype in ("float32", "bfloat16"):
        plain = q.load(ckpt, dtype=dtype, kernels="pallas")
        split = q.load(ckpt, dtype=dtype, kernels="pallas", tensor_parallel=1)
        tokens = np.random.default_rng(0).integers(0, plain.config.vocab_size, 50).tolist()
        for w, g in zip(run_forward(plain, tokens), run_forward(split, tokens)):
            assert relative_error(g, w) < (1e-6 if dtype == "float32" else 1e-2)
        params = q.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        want = q.LLM(plain, **ENGINE).generate([tokens], params, use_tqdm=False)
        got = q.LLM(split, **ENGINE).generate([tokens], params, use_tqdm=False)
        assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_two_process_server_answers_as_one_process_does():
    """`qwen3-jax serve -tp 2` as two processes (`python -m qwen3_jax.server`, one CPU device each): process 0
    serves HTTP, process 1 follows; the answer equals the unsplit model's; SIGTERM on process 0 stops both."""
    from test_server import NO_THINKING, RECALL, ServerProcess, free_port

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    flags = ["--dtype", "float32", "-tp", "2", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2",
             "--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--num-blocks", "16"]
    follower = subprocess.Popen([sys.executable, "-m", "qwen3_jax.server", str(q.DEMO_MODEL_DIR), "--kernels",
                                 "reference", "--no-precompile", *flags, "--process-id", "1"],
                                env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        leader = ServerProcess(*flags, "--process-id", "0", env=env)
        try:
            status, body = leader.request("POST", "/v1/chat/completions", {
                "model": "demo", "messages": [{"role": "user", "content": RECALL}], "max_tokens": 16,
                "temperature": 0, **NO_THINKING})
        finally:
            assert leader.close() == 0
        assert status == 200, body
        assert follower.wait(60) == 0, follower.stdout.read()[-3000:]
    finally:
        follower.kill()
    want = q.LLM(q.load(q.DEMO_MODEL_DIR, dtype="float32", kernels="reference"), max_model_len=256, num_blocks=16,
                 max_num_seqs=4, precompile=False).chat(
        [{"role": "user", "content": RECALL}], q.SamplingParams(temperature=0, max_tokens=16),
        enable_thinking=False, use_tqdm=False)
    answer = body["choices"][0]["message"]["content"]
    assert "Flubarg" in answer and answer.strip() == want[0].outputs[0].text.strip()
