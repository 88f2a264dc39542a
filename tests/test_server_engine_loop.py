"""qwen3_jax/server/engine_loop.py on a real demo-model engine: an exception inside a step fails the requests then
in the engine with a 500, frees their blocks, and the loop serves the next request."""

import asyncio

import pytest

import qwen3_jax as q
from qwen3_jax.server.engine_loop import EngineError, EngineLoop
from qwen3_jax.server.errors import APIError
from qwen3_jax.server.serving import Group


class FailingSteps:
    """A real engine whose next step raises once `fail_next` is set (the fault a server must survive)."""

    def __init__(self, engine):
        self.engine, self.fail_next = engine, False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected step failure")
        return self.engine.step()


@pytest.fixture(scope="module")
def engine():
    model = q.load(q.DEMO_MODEL_DIR, kernels="reference")
    return FailingSteps(q.LLMEngine(model, max_num_seqs=4, max_model_len=256, num_blocks=32, precompile=False))


def test_step_exception_fails_requests_and_the_loop_keeps_serving(engine):
    prompt = engine.model.tokenizer.encode(engine.model.chat_prompt("Hello!", enable_thinking=False))
    params = q.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

    async def run():
        loop = EngineLoop(engine)
        loop.start(asyncio.get_running_loop())
        try:
            group = Group(loop, ["a", "b"])
            for h in loop.submit([("a", prompt, params), ("b", prompt, params)], group.sink):
                await h.accepted
            updates = group.updates()
            await updates.__anext__()  # both are generating
            engine.fail_next = True
            with pytest.raises(APIError) as failed:
                async for _ in updates:
                    pass
            assert failed.value.status == 500 and "injected step failure" in failed.value.message
            assert loop.step_errors == 1
            await asyncio.sleep(0.3)
            stats = loop.snapshot
            assert stats["blocks_free"] == stats["blocks_total"] and stats["running"] == 0
            # the next request runs to the end
            after = Group(loop, ["c"])
            (h,) = loop.submit([("c", prompt, q.SamplingParams(temperature=0, max_tokens=8))], after.sink)
            await h.accepted
            (out,) = await after.final()
            assert out.finished and out.finish_reason in ("stop", "length") and out.token_ids
        finally:
            loop.stop()

    asyncio.run(run())


def test_requests_left_at_stop_are_failed_not_forgotten(engine):
    prompt = engine.model.tokenizer.encode("Hello")
    params = q.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run():
        loop = EngineLoop(engine)
        loop.start(asyncio.get_running_loop())
        sink = asyncio.Queue()
        (h,) = loop.submit([("d", prompt, params)], sink)
        await h.accepted
        await sink.get()
        loop.stop()
        while True:
            rid, item = await asyncio.wait_for(sink.get(), 30)
            if isinstance(item, BaseException) or item.finished:
                return item

    item = asyncio.run(run())
    assert isinstance(item, EngineError) and "shutting down" in str(item)
    assert engine.stats()["blocks_free"] == engine.stats()["blocks_total"]
