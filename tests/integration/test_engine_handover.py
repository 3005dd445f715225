"""The one-sequence fast path and its handover to the batch, driven in-process on the tiny
model: a request that starts alone and is joined by another mid-prompt or mid-answer gives
the same tokens as when it runs alone all the way, greedy or seeded, and so does the one that
joined; cancels, stop strings and the prompt cache work on the fast path too."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxrouter import protocol
from mlxrouter.config import ModelSpec
from mlxrouter.engine import FaultPlan, TextEngine

LONG_SYSTEM = {"role": "system", "content": "You answer questions about the sea. " * 12}


def _messages(question: str) -> list[dict[str, str]]:
    return [LONG_SYSTEM, {"role": "user", "content": question}]


class Driver:
    """A TextEngine with its messages collected per request."""

    def __init__(self, model: Path, **spec: object) -> None:
        self.out: list[protocol.Message] = []
        # A small prefill step, so the 100-token prompt takes several steps on the fast path.
        self.engine = TextEngine(ModelSpec(id="tiny", path=str(model),
                                           **{"prefill_step_size": 32, **spec}),
                                 self.out.append, FaultPlan({}))
        self.engine.load()

    def submit(self, rid: int, question: str, **sampling: object) -> None:
        params = protocol.SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **sampling})
        self.engine.submit(protocol.Request(rid=rid, sampling=params,
                                            messages=_messages(question)))

    def run(self, steps: int | None = None) -> None:
        while self.engine.active and (steps is None or steps > 0):
            self.engine.step()
            steps = None if steps is None else steps - 1

    def tokens(self, rid: int) -> list[int]:
        """The bytes of each token as the logprobs report them, in order, for one request."""
        return [lp.raw for m in self.out if isinstance(m, protocol.Step)
                for d in m.deltas if d.rid == rid for lp in d.logprobs]

    def text(self, rid: int) -> str:
        return "".join(d.content for m in self.out if isinstance(m, protocol.Step)
                       for d in m.deltas if d.rid == rid)

    def end(self, rid: int) -> protocol.End | protocol.Error:
        (end,) = [m for m in self.out if isinstance(m, (protocol.End, protocol.Error))
                  and m.rid == rid]
        return end


@pytest.fixture(scope="module")
def driver_factory(tiny_model: Path):
    return lambda **spec: Driver(tiny_model, prompt_cache_bytes=0, **spec)


def _alone(make, question: str, **sampling: object) -> tuple[str, list[bytes]]:
    d = make()
    d.submit(1, question, logprobs=True, **sampling)
    d.run()
    assert isinstance(d.end(1), protocol.End)
    return d.text(1), d.tokens(1)


@pytest.mark.parametrize("join_after_steps", [0, 1, 3, 6, 12])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 11}],
                         ids=["greedy", "seeded"])
def test_a_request_joined_midway_answers_as_it_does_alone(driver_factory, join_after_steps,
                                                          sampling):
    first = _alone(driver_factory, "Why is the sea salty?", **sampling)
    second = _alone(driver_factory, "What is a tide?", **sampling)
    d = driver_factory()
    d.submit(1, "Why is the sea salty?", logprobs=True, **sampling)
    assert d.engine._solo is not None  # alone: the fast path
    d.run(join_after_steps)  # the prompt takes 4 steps at 32 tokens a step
    d.submit(2, "What is a tide?", logprobs=True, **sampling)
    d.run(1)
    assert d.engine._solo is None and d.engine.active == 2  # both in the batch now
    d.run()
    assert (d.text(1), d.tokens(1)) == first
    assert (d.text(2), d.tokens(2)) == second
    for rid in (1, 2):
        end = d.end(rid)
        assert isinstance(end, protocol.End) and end.completion_tokens == 24
        assert end.finish_reason == "length"


def test_a_request_after_a_batch_emptied_takes_the_fast_path_again(driver_factory):
    d = driver_factory()
    d.submit(1, "Why is the sea salty?")
    d.submit(2, "What is a tide?")  # joins: both in the batch
    assert d.engine._solo is not None and d.engine.active == 2
    d.run()
    d.submit(3, "Why is the sea salty?")
    assert d.engine._solo is not None
    d.run()
    assert d.text(3) == d.text(1)
    assert d.engine.active == 0


def test_cancel_on_the_fast_path_ends_it_and_frees_the_way(driver_factory):
    d = driver_factory()
    d.submit(1, "Why is the sea salty?")
    d.run(6)
    d.engine.cancel(1)
    assert d.end(1).finish_reason == "cancelled"
    assert d.engine.active == 0 and d.engine._solo is None
    d.submit(2, "What is a tide?")
    d.run()
    assert d.end(2).completion_tokens == 24


def test_stop_text_and_eos_on_the_fast_path(driver_factory, tiny_model):
    d = driver_factory()
    d.submit(1, "Why is the sea salty?")
    d.run()
    full = d.text(1)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    d.submit(2, "Why is the sea salty?", stop=[stop])
    d.run()
    assert d.text(2) == full[:full.index(stop)]
    assert d.end(2).finish_reason == "stop"
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    eos = load_tokenizer(tiny_model).eos_token_id
    d.submit(3, "Why is the sea salty?", logit_bias={eos: 100.0})
    d.run()
    assert d.end(3).finish_reason == "stop" and d.end(3).completion_tokens == 1
    assert d.engine.active == 0


def test_the_fast_path_leaves_its_cache_for_the_next_turn(tiny_model):
    d = Driver(tiny_model)  # the prompt cache on
    d.submit(1, "Why is the sea salty?")
    d.run()
    d.submit(2, "Why is the sea salty?")
    d.run()
    end = d.end(2)
    assert end.cached_tokens >= end.prompt_tokens - 1 > 0
    assert d.text(2) == d.text(1)


def test_penalties_go_to_the_batch_and_answer_the_same_there(driver_factory):
    d = driver_factory()
    d.submit(1, "Why is the sea salty?", frequency_penalty=1.5)
    assert d.engine._solo is None  # a processor that reads the history: the batch
    d.run()
    assert d.end(1).completion_tokens == 24


def test_the_fast_path_can_be_turned_off_and_the_batch_answers_the_same(driver_factory):
    first = _alone(driver_factory, "Why is the sea salty?")
    d = driver_factory(solo_fast_path=False)
    d.submit(1, "Why is the sea salty?", logprobs=True)
    assert d.engine._solo is None
    d.run()
    assert (d.text(1), d.tokens(1)) == first


def test_batched_logit_bias_answers_as_mlx_lms_row_by_row_loop(driver_factory, tiny_model,
                                                                 monkeypatch):
    """A batch whose processors are all logit_bias adds them as one array (batched_bias): the
    same tokens and logprobs as mlx-lm's own per-row loop, each row with its own bias, while
    rows finish at different steps and join midway (the array is rebuilt), and while a row
    with a penalty sends the whole batch to mlx-lm's loop."""
    import sys

    from mlx_lm.generate import BatchGenerator
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlxrouter import engine

    generation_batch = sys.modules[BatchGenerator.__module__].GenerationBatch
    eos = load_tokenizer(tiny_model).eos_token_id
    forced = 7
    first = {1: ({forced: 100.0}, 24), 2: ({eos: -100.0}, 10), 3: ({}, 16),
             4: ({eos: -100.0, 11: 2.5}, 24), 5: ({eos: -100.0}, 6)}
    joining = {6: ({forced: -3.0, eos: -100.0}, 12)}
    penalized = 5  # presence_penalty too: the batch takes the loop until it ends
    calls: list[int] = []
    arrays: set[int] = set()
    real_call, real_get = engine._BiasedModel.__call__, engine._BiasRows.get
    monkeypatch.setattr(engine._BiasedModel, "__call__",
                        lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    monkeypatch.setattr(engine._BiasRows, "get",
                        lambda self, *a: arrays.add(id(got := real_get(self, *a))) or got)

    def submit(d: Driver, requests: dict) -> None:
        for rid, (bias, max_tokens) in requests.items():
            extra = {"presence_penalty": 0.5} if rid == penalized else {}
            d.submit(rid, "Why is the sea salty?", logprobs=True, top_logprobs=2,
                     logit_bias=bias, max_tokens=max_tokens, **extra)

    runs = []
    for on in (True, False):
        d = driver_factory(solo_fast_path=False)
        engine.batched_bias(generation_batch, on)
        try:
            submit(d, first)
            d.run(steps=4)
            submit(d, joining)
            d.run()
        finally:
            engine.batched_bias(generation_batch)
        runs.append(d)
        if on:
            assert len(calls) >= 15  # the steps after the penalized row ended
            assert len(arrays) >= 3  # rebuilt as rows ended and joined
            calls.clear()
    assert not calls  # and none with mlx-lm's loop back
    fast, loop = runs
    for rid, (_, max_tokens) in {**first, **joining}.items():
        assert fast.end(rid).completion_tokens == loop.end(rid).completion_tokens
        assert fast.text(rid) == loop.text(rid) and fast.tokens(rid) == loop.tokens(rid)
    assert fast.end(2).completion_tokens == 10 and fast.end(4).completion_tokens == 24
    assert len(set(fast.tokens(1))) == 1 and len(fast.tokens(1)) == 24  # the forced token

    def logprobs(d: Driver) -> list:
        return [(lp.raw, lp.logprob, [(t.raw, t.logprob) for t in lp.top])
                for m in d.out if isinstance(m, protocol.Step) for x in m.deltas
                for lp in x.logprobs]

    assert logprobs(fast) == logprobs(loop)


@pytest.mark.parametrize("solo", [True, False])
def test_prefill_step_size_is_how_many_prompt_tokens_a_step_runs(driver_factory, solo):
    """The model's other streams wait, and a cancel is seen, only between these chunks."""
    steps_for = {}
    for size in (16, 4096):
        driver = driver_factory(prefill_step_size=size, solo_fast_path=solo)
        assert driver.engine.gen.prefill_step_size == size
        driver.submit(1, "How deep is the sea?", max_tokens=1)
        steps = 0
        while driver.engine.active:
            driver.engine.step()
            steps += 1
        end = driver.end(1)
        assert isinstance(end, protocol.End) and end.prompt_tokens > 96
        steps_for[size] = (steps, end.prompt_tokens)
    (small, prompt), (whole, _) = steps_for[16], steps_for[4096]
    assert small >= prompt // 16 and whole <= 3, steps_for
