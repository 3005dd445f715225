"""Generation on mlx-lm: one BatchGenerator, continuous batching, structured deltas out; a
request alone decodes on a one-sequence fast path (`Solo`) until another joins.

Runs in a worker process, on its engine thread only: MLX streams are thread-bound, so this
thread loads the model and runs every step. Requests join and leave the batch between steps.
Every call into mlx-lm lives here or in `chat`, since its APIs move between versions.

Errors: an exception in per-request code (template, tokenization, context check) fails only
that request; an exception out of the batch step is the caller's to handle (it ends the worker).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import msgspec
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.utils import dequantize_model
from mlx_lm.generate import BatchGenerator, TextStateMachine
from mlx_lm.models.cache import (LRUPromptCache, can_trim_prompt_cache, make_prompt_cache,
                                 trim_prompt_cache)
from mlx_lm.sample_utils import (apply_min_p, apply_top_k, apply_top_p, greedy_sampler,
                                 make_logits_processors)

from . import protocol
from .chat import HeldLogprobs, StopText, check_template, render_chat, render_completion
from .constrain import ConstraintFactory
from .templates import TOOL_FORMAT, template_source
from .toolcalls import ToolCallStream, detect_format, format_by_name
from .config import ModelSpec
from .errors import ContextLengthExceeded, InvalidRequest, RouterError
from .memory import effective_context, model_max_context, stored_bits

log = logging.getLogger(__name__)

Emit = Callable[[protocol.Message], None]

# Tool-call formats whose calls constrain.grammar_for_tool_call can write (a JSON object with
# name and arguments, between the format's markers): forced tool choice works for these.
FORCEABLE_FORMATS = frozenset({"hermes", "phi4", "llama3_json"})


# Below these a temperature's inverse times a log probability overflows float32, and a top_p
# is 0 in float32 (every token dropped, the sample drawn from garbage): the limit of both
# towards 0 is the most likely token, which is what these give.
MIN_TEMPERATURE = 1e-20
MIN_TOP_P = 1e-30


def make_sampler(params: protocol.SamplingParams) -> Callable[[mx.array], mx.array]:
    """mlx-lm's filters with a per-request random key, so seeded requests stay in the batch.

    MLX's random state is global; a key of our own per sequence makes a seeded request draw
    the same samples whatever else shares the batch (from logits that a system BLAS can round
    differently when the prompt was prefilled with others: agents.md's `seed`). Greedy
    requests share mlx-lm's one
    `greedy_sampler`, which lets the batch sample them in one call.
    """
    if params.temperature < MIN_TEMPERATURE:  # 0, or so close that 1/t overflows the logits
        return greedy_sampler
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    key = mx.random.key(seed % 2**63)  # OpenAI seeds may be negative; MLX keys may not
    filters = []
    if 0 < params.top_p < 1.0:
        # a top_p that is 0 in float32 would drop every token: the smallest keeps the top one
        top_p = max(params.top_p, MIN_TOP_P)
        filters.append(lambda x: apply_top_p(x, top_p))
    if params.min_p > 0:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        filters.append(lambda x: apply_top_k(x, params.top_k))
    inv_temp = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        for f in filters:
            logprobs = f(logprobs)
        # float32: float16 log probabilities times 1/t overflow to -inf for every token from
        # t ~ 1.5e-5 (a float16 model on Metal), and the draw is then uniform
        return mx.random.categorical(logprobs.astype(mx.float32) * inv_temp, key=sub)

    return sample


class LogitBias:
    """logit_bias as mlx-lm's processor applies it (a scatter-add of the values at the ids),
    marked so that a batch whose processors are all biases adds them as one (batch, vocab)
    array instead (`batched_bias`): the same float additions, as one operation where
    GenerationBatch otherwise slices, scatters and concatenates row by row."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.bias = dict(bias)
        self._ids = mx.array(list(self.bias))
        self._values = mx.array(list(self.bias.values()))

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, self._ids].add(self._values)


class _BiasedModel:
    """The batch's model with each row's bias added to its logits."""

    def __init__(self, model: Any, rows: list, cache: _BiasRows) -> None:
        self.model, self.rows, self.cache = model, rows, cache

    def __getattr__(self, name: str) -> Any:  # anything else GenerationBatch may read
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        logits = self.model(*args, **kwargs)  # (batch, 1, vocab) in mlx-lm 0.32
        if logits.ndim not in (2, 3) or logits.shape[0] != len(self.rows):
            raise RuntimeError(f"batched_bias: logits of shape {logits.shape} for "
                               f"{len(self.rows)} rows; this mlx-lm needs its own loop")
        bias = self.cache.get(self.rows, logits.shape[-1]).astype(logits.dtype)
        return logits + (bias[:, None, :] if logits.ndim == 3 else bias)


class _BiasRows:
    """The (batch, vocab) bias array of the last set of rows, rebuilt when the rows change."""

    def __init__(self) -> None:
        self.rows: list = []
        self.array: mx.array | None = None

    def get(self, rows: list, vocab: int) -> mx.array:
        same = (len(rows) == len(self.rows) and all(a is b for a, b in zip(rows, self.rows))
                and self.array is not None and self.array.shape[1] == vocab)
        if not same:
            import numpy as np

            dense = np.zeros((len(rows), vocab), np.float32)
            for i, row in enumerate(rows):
                for bias in row:  # at most one (batched_bias)
                    # ids past the logits (a model whose config names no vocab_size, so
                    # the request's ids went unchecked) bias nothing, not the whole batch
                    ids = [t for t in bias.bias if t < vocab]
                    dense[i, ids] = [bias.bias[t] for t in ids]
            self.rows, self.array = list(rows), mx.array(dense)
        return self.array


def batched_bias(generation_batch: type | None, on: bool = True) -> None:
    """Make `generation_batch._step` (mlx-lm's GenerationBatch) add the rows' logit_bias as
    one array when every processor in the batch is a LogitBias: the per-row loop costs about
    2.5 ms a step at 8 streams here (a SmolLM2 step is 20-30 ms). Any other processor, and
    any mlx-lm whose GenerationBatch lacks what this relies on, keeps mlx-lm's own loop.
    Adding 0.0 leaves a logit as it is, so the result is the loop's, bit for bit.
    `on=False` puts mlx-lm's own back (for comparisons)."""
    step = getattr(generation_batch, "_step", None) if generation_batch else None
    if step is None or not on:
        if step is not None and hasattr(step, "mlx_lm_step"):
            generation_batch._step = step.mlx_lm_step
        return
    if hasattr(step, "mlx_lm_step"):
        return
    cache = _BiasRows()

    def _step(self: Any, *args: Any, **kwargs: Any) -> Any:
        rows = getattr(self, "logits_processors", None)
        model = getattr(self, "model", None)
        if (not rows or model is None or not any(rows) or any(len(row) > 1 for row in rows)
                or not all(isinstance(p, LogitBias) for row in rows for p in row)):
            return step(self, *args, **kwargs)
        try:
            self.model = _BiasedModel(model, rows, cache)
            self.logits_processors = [()] * len(rows)
            return step(self, *args, **kwargs)
        finally:
            self.model, self.logits_processors = model, rows

    _step.mlx_lm_step = step  # type: ignore[attr-defined]
    generation_batch._step = _step


class Sequence:
    def __init__(self, req: protocol.Request, uid: int, detok: Any, prompt_tokens: int,
                 received_at: float) -> None:
        self.rid = req.rid
        self.request_id = req.request_id or "-"
        self.uid = uid
        self.cached_tokens = 0
        self.split: Any = None  # a TextStateMachine state while the model may reason
        self.detok = detok
        # Stop strings apply to content; a forced tool call's output is all call (its grammar
        # allows nothing else), where one matched inside cut the call: no call came back.
        forced_call = bool(req.tools) and req.tool_choice != "auto"
        self.stop = StopText([] if forced_call else req.sampling.stop)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        # Alternatives per token when the request asked for logprobs, else None.
        self.top_logprobs = req.sampling.top_logprobs if req.sampling.logprobs else None
        self.byte_exact = True  # _byte_exact(detok), set at admission (text_offset)
        self.held = HeldLogprobs()  # their entries, released with their tokens' text
        self.tools: Any = None  # a toolcalls.ToolCallStream when the output may hold calls
        self.constraint: Any = None  # a constrain.GrammarProcessor when decoding is constrained
        self.one_call = not req.parallel_tool_calls
        self.received_at = received_at  # when the engine took the Request (End.elapsed_s)

    def route(self, text: str, final: bool) -> tuple[str, str, list[protocol.ToolCallDelta]]:
        """(content, reasoning, tool call pieces) of newly decoded text, its reasoning split
        off already (split_reasoning); tool-call markup never reaches content."""
        content, reasoning = text, ""
        if self.tools is None:
            return content, reasoning, []
        parsed = self.tools.feed(content)
        content, calls = parsed.content, list(parsed.calls)
        reasoning += parsed.reasoning
        if final:
            rest = self.tools.finish()
            content, reasoning = content + rest.content, reasoning + rest.reasoning
            calls += rest.calls
        return content, reasoning, [
            protocol.ToolCallDelta(index=c.index, id=c.id or "", name=c.name or "",
                                   arguments=c.arguments or "") for c in calls]

    def split_reasoning(self, text: str, final: bool) -> tuple[str, str]:
        """(answer, reasoning) of newly decoded text; the markers reach neither."""
        if self.split is None:
            return text, ""
        out = {"normal": "", "reasoning": ""}
        self.split, segments = TextStateMachine.split(self.split, text)
        if final:
            self.split, rest, state = TextStateMachine.flush(self.split)
            segments.append((state, rest))
        for state, piece in segments:
            out["reasoning" if state == "reasoning" else "normal"] += piece
        return out["normal"], out["reasoning"]


class SoloResponse(NamedTuple):
    """What GenerationBatch.Response carries, for the one sequence on the fast path."""

    uid: int
    token: int
    logprobs: mx.array
    finish_reason: str | None
    prompt_cache: list | None
    all_tokens: list[int] | None


class Solo:
    """One sequence decoded on plain KV caches the way `mlx_lm.generate_step` decodes it,
    while it is the only one: BatchGenerator's batch bookkeeping (a mask and per-row offsets
    in every attention layer, per-row sampling and splits) made a one-stream step about 3%
    slower here. The engine moves it into the batch (`handover`) when a second request comes.

    Only for requests whose logits processors look at no context (logit_bias or none):
    penalties and grammars see the token history, which the batch keeps its own way."""

    def __init__(self, model: Any, uid: int, rest: list[int], cache: list, fed: list[int],
                 eos: set[int], sampler: Callable, processors: list, max_tokens: int,
                 prefill_step_size: int) -> None:
        self.model = model
        self.uid = uid
        self.todo = list(rest)  # prompt tokens not run yet
        self.cache = cache
        self.fed = list(fed)  # the tokens the cache holds
        self.eos = eos
        self.sampler = sampler
        self.processors = processors
        self.max_tokens = max_tokens
        self.prefill_step_size = prefill_step_size
        self.made = 0  # tokens handed out
        self._next: tuple[mx.array, mx.array] | None = None  # sampled, not handed out yet

    def _forward(self, tokens: mx.array) -> tuple[mx.array, mx.array]:
        logits = self.model(tokens[None], cache=self.cache)[:, -1, :]
        for processor in self.processors:
            logits = processor(None, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        out = (self.sampler(logprobs), logprobs.squeeze(0))
        mx.async_eval(*out)
        return out

    def next(self) -> SoloResponse | None:
        """One prompt chunk (None) or one token, the step after it already under way."""
        if len(self.todo) > 1:
            n = min(self.prefill_step_size, len(self.todo) - 1)
            self.model(mx.array(self.todo[:n])[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            self.fed += self.todo[:n]
            del self.todo[:n]
            return None
        if self._next is None:
            self._next = self._forward(mx.array(self.todo))
            self.fed += self.todo
            self.todo = []
        token, logprobs = self._next
        self.made += 1
        self._next = self._forward(token) if self.made < self.max_tokens else None
        return self._respond(token, logprobs, fed=self._next is not None)

    def take_pending(self) -> SoloResponse | None:
        """The token already sampled, handed out without starting another step, before a
        handover; it becomes the batch's first input. None while the prompt is still running."""
        if self._next is None:
            return None
        token, logprobs = self._next
        self._next = None
        self.made += 1
        response = self._respond(token, logprobs, fed=False)
        self.todo = [response.token]
        return response

    def _respond(self, token: mx.array, logprobs: mx.array, fed: bool) -> SoloResponse:
        value = token.item()
        if fed:
            self.fed.append(value)
        finish = ("stop" if value in self.eos else
                  "length" if self.made >= self.max_tokens else None)
        done = finish is not None
        return SoloResponse(self.uid, value, logprobs, finish, self.cache if done else None,
                            self.fed if done else None)


class FaultPlan:
    """Test aid: faults injected into the real engine path (never a feature's only proof)."""

    def __init__(self, fault: dict[str, float]) -> None:
        self.load_delay_s = float(fault.get("load_delay_s", 0))
        self.fail_load = bool(fault.get("fail_load", 0))
        self.delay_per_token_s = float(fault.get("delay_per_token_s", 0))
        self.crash_after_tokens = int(fault.get("crash_after_tokens", 0))
        self.oom_after_tokens = int(fault.get("oom_after_tokens", 0))
        self.stall_after_tokens = int(fault.get("stall_after_tokens", 0))
        # A long prompt's processing, as the client sees it: Started, then nothing for a while.
        self.prefill_delay_s = float(fault.get("prefill_delay_s", 0))
        # A bug in handling one sequence's output (a parser, say) at its Nth token.
        self.output_error_at_token = int(fault.get("output_error_at_token", 0))


def _max_context(spec: ModelSpec, config: dict[str, Any]) -> int:
    return effective_context(spec.max_context, model_max_context(config))


def check_logit_bias(logit_bias: dict[int, float], vocab_size: int) -> None:
    """A 400 for token ids past the vocabulary, naming the first few (a request may send
    hundreds of thousands, and the error must not echo them all)."""
    bad = [t for t in logit_bias if t >= vocab_size]
    if bad:
        shown = f"{bad[:8]}" + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise InvalidRequest(f"logit_bias token ids {shown} are outside the vocabulary "
                             f"({vocab_size} tokens)", param="logit_bias")


def fit_max_tokens(sampling: protocol.SamplingParams, prompt_tokens: int, max_context: int,
                   what: str = "prompt tokens", param: str = "messages") -> int:
    """The request's max_tokens if prompt + max_tokens fits the context; a default max_tokens
    (the client set none) lowered to the room left; else 400 context_length_exceeded naming
    `param` (the messages or the prompt, as OpenAI does)."""
    max_tokens = sampling.max_tokens
    asked = max(max_tokens, sampling.asked_max_tokens)
    if prompt_tokens + asked <= max_context:
        return max_tokens
    if sampling.fit_to_context and prompt_tokens < max_context:
        return max_context - prompt_tokens
    if sampling.fit_to_context:  # the client asked for nothing: the prompt alone is too long
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_context} tokens; the request has "
            f"{prompt_tokens} {what}, which leaves no room for a completion", param=param)
    raise ContextLengthExceeded(
        f"This model's maximum context length is {max_context} tokens; the request has "
        f"{prompt_tokens} {what} and asks for {asked} more", param=param)


def _chars(content: Any) -> int:
    """Characters of a message's content: a string, or text parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


def _context_free(p: protocol.SamplingParams) -> bool:
    """No logits processor that reads the token history (logit_bias reads none)."""
    return (p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty)


class TextEngine:
    def __init__(self, spec: ModelSpec, emit: Emit, fault: FaultPlan,
                 memory_limit: int = 0) -> None:
        self.spec = spec
        self.memory_limit = memory_limit
        self.emit = emit
        self.fault = fault
        self.steps = 0
        self.tokens_generated = 0
        self._seqs: dict[int, Sequence] = {}  # by BatchGenerator uid
        self._uid_of: dict[int, int] = {}  # rid -> uid
        self._solo: Solo | None = None  # the one sequence, while it is the only one
        self._solo_uids = 0  # negative uids for it: never a BatchGenerator's
        self.max_context = 0
        self.weights_bytes = 0  # as they sit in memory, half copies included
        self.half_copies = (0, 0)  # how many, bytes
        self._texts: dict[int, tuple[str, bytes]] = {}  # token id -> text, bytes (logprobs)
        self._think_ids: set[int] = set()

    @property
    def active(self) -> int:
        return len(self._seqs)

    def load(self) -> None:
        path = Path(self.spec.path)
        if self.fault.load_delay_s:
            time.sleep(self.fault.load_delay_s)
        if self.fault.fail_load:
            raise RuntimeError("fault injection: load failed")
        self.model, self.tokenizer, config = mlx_load(str(path), return_config=True)
        self.model, self.load_dtype = convert_weights(self.model, self.spec.load_dtype)
        self.max_context = _max_context(self.spec, config)
        self.half_copies = half_copies(self.model, self.spec, config, self.load_dtype)
        self.weights_bytes = (sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
                              + self.half_copies[1])
        self.vocab_size = int(config.get("vocab_size")
                              or config.get("text_config", {}).get("vocab_size") or 0) or 2**31
        tok = self.tokenizer  # its reasoning markers' ids (a marker token is not the answer)
        self._think_ids = (set(tok.think_start_tokens or ()) | set(tok.think_end_tokens or ())
                           if getattr(tok, "has_thinking", False) else set())
        self.chat_template = (template_source(self.spec.chat_template)
                              if self.spec.chat_template else None)
        check_template(self.chat_template or getattr(self.tokenizer, "chat_template", None),
                       f"chat_template {self.spec.chat_template}" if self.spec.chat_template
                       else "the model's tokenizer")
        self.tool_format = self._tool_format()
        self.constraints: ConstraintFactory | None = None
        self.gen = self._new_batch()
        self.prompt_cache = (LRUPromptCache(max_size=self.spec.prompt_cache_size,
                                            max_bytes=self.spec.prompt_cache_bytes)
                             if self.spec.prompt_cache_bytes > 0 else None)
        self._cache_too_small_said = False
        self._longest_token: int | None = None  # characters, worked out at the first request
        self._limit_memory()

    def _tool_format(self) -> Any:
        """How this model writes tool calls: configured, else detected from its tokenizer and
        chat template; None when it cannot take tools (or supports_tools = false), except for
        harmony (gpt-oss), whose channels are its output format with or without tools."""
        fmt = self._call_format()
        if self.spec.supports_tools is False or not self.spec.enable_function_calling:
            return fmt if fmt is not None and fmt.style == "harmony" else None
        return fmt

    @property
    def tools_enabled(self) -> bool:
        return (self.tool_format is not None and self.spec.supports_tools is not False
                and self.spec.enable_function_calling)

    def _call_format(self) -> Any:
        if self.spec.tool_call_format:
            return format_by_name(self.spec.tool_call_format)
        if self.spec.chat_template in TOOL_FORMAT:
            try:
                return format_by_name(TOOL_FORMAT[self.spec.chat_template])
            except ValueError:  # a call format with no parser (kept as a guard)
                log.warning("no parser for the tool calls of chat template %r; requests "
                            "with tools are refused", self.spec.chat_template)
                return None
        return detect_format(self.tokenizer)

    def _new_batch(self) -> BatchGenerator:
        batched_bias(getattr(sys.modules[BatchGenerator.__module__], "GenerationBatch", None))
        return BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
            completion_batch_size=self.spec.max_running,
            prefill_batch_size=min(8, self.spec.max_running),
            prefill_step_size=self.spec.prefill_step_size,
        )

    def _limit_memory(self) -> None:
        """Hold MLX to what the supervisor budgeted (BatchGenerator would otherwise wire the
        whole recommended working set on Metal, in every worker)."""
        if not self.memory_limit:
            return
        spare = max(0, self.memory_limit - self.weights_bytes)
        mx.set_cache_limit(max(64 * 2**20, spare // 2))
        if mx.metal.is_available():
            mx.set_wired_limit(min(self.memory_limit,
                                   mx.metal.device_info()["max_recommended_working_set_size"]))

    # ---- per request

    def submit(self, req: protocol.Request) -> None:
        """Per-request code: whatever goes wrong here fails this request, never the worker."""
        try:
            self._admit(req, time.monotonic())
        except RouterError as exc:
            self.emit(protocol.Error(rid=req.rid, code=exc.code, message=exc.message,
                                     param=exc.param))
        except Exception as exc:  # template, tokenizer, sampler setup: the request's fault
            log.warning("request rejected request_id=%s rid=%d: %r", req.request_id or "-",
                        req.rid, exc)
            self.emit(protocol.Error(rid=req.rid, code="invalid_request",
                                     message=f"the request could not be processed: {exc}"))

    def _admit(self, req: protocol.Request, received_at: float) -> None:
        if req.tools and not self.tools_enabled:
            raise InvalidRequest(f"model '{self.spec.id}' does not support tool calling (no "
                                 f"tool-call format was recognised from its chat template "
                                 f"and tokenizer, and no tool_call_format is configured)",
                                 param="tools")
        self._refuse_if_it_cannot_fit(req)
        if req.messages is not None:
            prompt = render_chat(self.tokenizer, req.messages, tools=req.tools,
                                 template=self.chat_template, extra=req.template_kwargs)
        elif req.prompt is not None:
            prompt = render_completion(self.tokenizer, req.prompt)
        else:
            raise InvalidRequest("request has neither messages nor prompt")
        if not prompt:  # ("" is a prompt for a tokenizer that adds a BOS token)
            raise InvalidRequest("the prompt is empty (it encodes to no tokens)",
                                 param="prompt" if req.messages is None else "messages")
        if req.prompt is not None and not isinstance(req.prompt, str):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:  # an id past the embedding table reads (or crashes on) foreign memory
                raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                     f"({self.vocab_size} tokens)", param="prompt")
        max_tokens = fit_max_tokens(req.sampling, len(prompt), self.max_context,
                                    param="messages" if req.messages is not None else "prompt")
        sampling = req.sampling
        if sampling.top_k >= self.vocab_size:  # keeps every token: the same as no top-k
            sampling = msgspec.structs.replace(sampling, top_k=0)
        constraint = self._constraint(req)
        processors = self._processors(sampling, max_tokens) + (
            [constraint] if constraint is not None else [])
        cache, rest = self._cached_prefix(prompt)
        cached = len(prompt) - len(rest)
        sampler = make_sampler(sampling)
        if (self.spec.solo_fast_path and not self._seqs and constraint is None
                and _context_free(sampling)):
            self._solo_uids -= 1
            uid = self._solo_uids
            self._solo = Solo(self.model, uid, rest, cache or make_prompt_cache(self.model),
                              prompt[:cached], set(self.tokenizer.eos_token_ids),
                              sampler, processors, max_tokens,
                              self.gen.prefill_step_size)
        else:
            (uid,) = self.gen.insert([rest], max_tokens=[max_tokens], caches=[cache],
                                     all_tokens=[prompt[:cached]],
                                     samplers=[sampler], logits_processors=[processors])
        detok = (self.tokenizer.detokenizer if req.messages is not None
                 else continuing_detokenizer(self.tokenizer))
        seq = Sequence(req, uid, detok, len(prompt), received_at)
        seq.byte_exact = _byte_exact(detok)
        seq.cached_tokens = cached
        seq.constraint = constraint
        if req.messages is not None:
            # A constrained sequence writes the grammar's output from its first token: that is
            # the answer, even after a template that opened a reasoning block.
            seq.split = self._reasoning_split(prompt) if constraint is None else None
            if self.tool_format is not None and (req.tools or self.tool_format.style == "harmony"):
                seq.tools = ToolCallStream(self.tool_format, req.tools or [])
        self._seqs[uid] = seq
        self._uid_of[req.rid] = uid
        log.info("request started request_id=%s rid=%d prompt_tokens=%d cached_tokens=%d "
                 "max_tokens=%d", req.request_id or "-", req.rid, len(prompt), cached,
                 max_tokens)
        self.emit(protocol.Started(rid=req.rid, prompt_tokens=len(prompt),
                                   cached_tokens=cached))
        if self.fault.prefill_delay_s:
            time.sleep(self.fault.prefill_delay_s)

    def _reasoning_split(self, prompt: list[int]) -> Any:
        """mlx-lm's text state machine over the reasoning markers, or None for models without
        them. Templates that open the reasoning block themselves start inside it."""
        tok = self.tokenizer
        if not tok.has_thinking:
            return None
        machine = TextStateMachine({"normal": [(tok.think_start, "reasoning")],
                                    "reasoning": [(tok.think_end, "normal")]})
        tail = tok.decode(prompt[-8:]).rstrip()
        opened = tail.endswith(tok.think_start)
        return machine.make_state(initial="reasoning" if opened else "normal")

    def _refuse_if_it_cannot_fit(self, req: protocol.Request) -> None:
        """A 400 before tokenizing for text that cannot fit the context whatever it encodes
        to: more characters than max_context tokens of the vocabulary's longest could hold,
        or more messages than tokens (each renders at least one). Tokenizing megabytes takes
        seconds on the engine thread, and every stream of this model waited for it."""
        if req.messages is not None:
            count, what, param = len(req.messages), "messages", "messages"
            chars = sum(_chars(m.get("content")) for m in req.messages)
        elif isinstance(req.prompt, str):
            count, what, param, chars = 0, "", "prompt", len(req.prompt)
        else:
            return
        if self._longest_token is None:
            try:
                vocab = self.tokenizer._tokenizer.get_vocab()
                self._longest_token = max((len(t) for t in vocab), default=1) or 1
            except Exception:  # a tokenizer without a vocabulary to read: no early check
                self._longest_token = 2**31
        most = self.max_context * self._longest_token
        if count > self.max_context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_context} tokens; the "
                f"request has {count} {what}, each at least one token", param=param)
        if chars > most:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_context} tokens; the "
                f"request's text ({chars} characters) is longer than {self.max_context} "
                f"tokens can be (its longest token has {self._longest_token} characters)",
                param=param)

    def _cached_prefix(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        """The KV cache of the longest known prefix of `prompt`, and the tokens still to run.

        An exact hit leaves nothing to run, which BatchGenerator cannot take (mlx_lm.server
        0.32.2 loses its generation thread to it): trim one token and run that one again.
        """
        if self.prompt_cache is None:
            return None, prompt
        cache, rest = self.prompt_cache.fetch_nearest_cache(self.spec.id, prompt)
        if cache is not None and not rest:
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _remember(self, tokens: list[int], cache: list | None) -> None:
        """Keep a finished sequence's KV cache for the next turn (bounded by bytes)."""
        if self.prompt_cache is None or not cache:
            return
        size = sum(c.nbytes for c in cache)
        if size > self.prompt_cache.max_bytes:
            # LRUPromptCache would take it and drop it at once: say so, once
            if not self._cache_too_small_said:
                self._cache_too_small_said = True
                log.warning("prompt cache: a finished sequence of %d tokens has a KV cache of "
                            "%d bytes, more than prompt_cache_bytes = %d, so it is not kept and "
                            "the next turn starts cold; raise prompt_cache_bytes (or set 0 to "
                            "turn the cache off)", len(tokens), size,
                            self.prompt_cache.max_bytes)
            return
        self.prompt_cache.insert_cache(self.spec.id, list(tokens), cache)

    def _processors(self, p: protocol.SamplingParams, max_tokens: int) -> list:
        """mlx-lm's logits processors; OpenAI's penalties look at everything generated."""
        check_logit_bias(p.logit_bias, self.vocab_size)
        return ([LogitBias(p.logit_bias)] if p.logit_bias else []) + make_logits_processors(
            repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1.0 else None,
            presence_penalty=p.presence_penalty or None, presence_context_size=max_tokens,
            frequency_penalty=p.frequency_penalty or None, frequency_context_size=max_tokens)

    def _constraint(self, req: protocol.Request) -> Any:
        """An llguidance processor for response_format's grammar or a forced tool call."""
        forced = bool(req.tools) and req.tool_choice != "auto"
        if req.grammar is None and not forced:
            return None
        fmt = self.tool_format
        if forced and fmt.name not in FORCEABLE_FORMATS:
            raise InvalidRequest(
                f"tool_choice 'required' or a named function cannot be enforced for this "
                f"model's tool-call format ({fmt.name}); use tool_choice 'auto'",
                param="tool_choice")
        if self.constraints is None:
            self.constraints = ConstraintFactory(self.tokenizer)
        grammar = req.grammar
        if forced:  # the call as the model's own format writes it (chat-templates.md)
            start, end = fmt.start, fmt.end
            if fmt.name == "phi4":  # a JSON list of calls between the markers
                start, end = start + "[", "]" + end
            grammar = self.constraints.tool_call_grammar(
                req.tools, req.tool_choice, start, end,
                args_key="parameters" if fmt.name == "llama3_json" else "arguments")
        processor = self.constraints.processor(grammar)
        n_logits = (self.vocab_size if self.vocab_size < 2**31
                    else self.constraints.ll_tokenizer.vocab_size)
        processor.precheck(n_logits, param="tool_choice" if forced else "response_format")
        return processor

    def cancel(self, rid: int) -> None:
        uid = self._uid_of.get(rid)
        if uid is None:
            return  # unknown or already finished: ignored by the protocol
        self._drop(uid)  # a cancelled sequence's cache is not worth keeping
        seq = self._seqs[uid]
        self._end(seq, "cancelled")

    def _end(self, seq: Sequence, finish_reason: str) -> None:
        del self._seqs[seq.uid]
        del self._uid_of[seq.rid]
        if seq.constraint is not None and seq.constraint.error is not None:
            # The grammar could not go on (ended with eos): not an answer to pass off as one.
            log.error("constrained decoding failed request_id=%s rid=%d: %s", seq.request_id,
                      seq.rid, seq.constraint.error)
            self.emit(protocol.Error(rid=seq.rid, code="constraint_failed",
                                     message=f"constrained decoding failed: "
                                             f"{seq.constraint.error}"))
            return
        log.info("request ended request_id=%s rid=%d finish=%s completion_tokens=%d",
                 seq.request_id, seq.rid, finish_reason, seq.completion_tokens)
        self.emit(protocol.End(rid=seq.rid, finish_reason=finish_reason,
                               prompt_tokens=seq.prompt_tokens,
                               completion_tokens=seq.completion_tokens,
                               cached_tokens=seq.cached_tokens,
                               elapsed_s=time.monotonic() - seq.received_at))

    # ---- the batch step

    def _is_solo(self, uid: int) -> bool:
        return self._solo is not None and self._solo.uid == uid

    def _drop(self, uid: int) -> None:
        """Take a sequence out of the batch (or off the fast path), its cache discarded."""
        if self._is_solo(uid):
            self._solo = None
        else:
            self.gen.remove([uid])

    def _handover(self) -> None:
        """A second sequence came: the one on the fast path joins the batch where it is,
        with its KV cache, sampler (its random key included) and the tokens it has left."""
        solo, self._solo = self._solo, None
        assert solo is not None
        seq = self._seqs.pop(solo.uid)
        (uid,) = self.gen.insert([solo.todo], max_tokens=[solo.max_tokens - solo.made],
                                 caches=[solo.cache], all_tokens=[solo.fed],
                                 samplers=[solo.sampler], logits_processors=[solo.processors])
        seq.uid = uid
        self._seqs[uid] = seq
        self._uid_of[seq.rid] = uid

    def step(self) -> None:
        self.steps += 1
        deltas: list[protocol.Delta] = []
        ended: list[tuple[Sequence, str]] = []
        with mx.stream(self.gen.stream):
            if (solo := self._solo) is not None:
                joined = len(self._seqs) > 1
                r = solo.take_pending() if joined else solo.next()
                if r is not None:
                    self._handle([r], deltas, ended)
                if joined and self._solo is not None:
                    self._handover()
            if any(uid >= 0 for uid in self._seqs):  # the batch has sequences
                _, responses = self.gen.next()
                self._handle(responses, deltas, ended)
        if deltas:
            self.emit(protocol.Step(deltas=deltas))
        for seq, finish in ended:
            self._end(seq, finish)
        self._inject_faults()

    def _handle(self, responses: list, deltas: list[protocol.Delta],
                ended: list[tuple[Sequence, str]]) -> None:
        for r in responses:
            seq = self._seqs.get(r.uid)
            if seq is None:
                continue
            try:
                delta, finish = self._advance(seq, r)
            except Exception as exc:  # per-request code (detokenizer, stop text, parsers)
                self._fail_one(seq, r.finish_reason is None, exc)
                continue
            deltas.append(delta)
            if finish is not None:
                ended.append((seq, finish))
                if self._is_solo(seq.uid):
                    self._solo = None  # done: its cache went to _remember

    def _fail_one(self, seq: Sequence, running: bool, exc: Exception) -> None:
        """What went wrong handling one sequence's output fails that request, not the batch."""
        log.error("request failed request_id=%s rid=%d: %r", seq.request_id, seq.rid, exc)
        if running or self._is_solo(seq.uid):
            self._drop(seq.uid)
        del self._seqs[seq.uid]
        del self._uid_of[seq.rid]
        self.emit(protocol.Error(rid=seq.rid, code="internal_error",
                                 message=f"the model's output could not be processed: "
                                         f"{type(exc).__name__}"))

    def _advance(self, seq: Sequence, r: Any) -> tuple[protocol.Delta, str | None]:
        """One sampled token of one sequence: its delta, and its finish reason if it ended."""
        seq.completion_tokens += 1
        if seq.completion_tokens == self.fault.output_error_at_token:
            raise ValueError("fault injection: output handling failed")
        self.tokens_generated += 1
        finish = r.finish_reason
        if finish != "stop":  # "stop" here means an EOS token: never shown
            seq.detok.add_token(r.token)
        if finish is not None:
            seq.detok.finalize()
        segment = seq.detok.last_segment
        # A reasoning model's text is split first: stop strings and logprobs are about the
        # answer (a stop "\n\n" ended a Qwen3-style answer inside its reasoning, empty; the
        # reasoning's tokens and markers were among logprobs, even with it disabled).
        thought = ""
        if seq.split is not None:
            segment, thought = seq.split_reasoning(segment, final=finish is not None)
        if seq.top_logprobs is not None and finish != "stop" and (
                segment or not (thought or r.token in self._think_ids)):
            entry = self._token_logprob(r.token, segment, r.logprobs, seq.top_logprobs)
            if not seq.byte_exact:  # its bytes may not be what shows (WordPiece "##")
                entry.chars = len(segment)
            seq.held.add(entry, segment)
        text, hit = seq.stop.feed(segment)
        if finish is not None:
            self._remember(r.all_tokens, r.prompt_cache)
        if hit:
            if finish is None:
                self._retire(r.uid)
            finish = "stop"
        elif finish is not None:
            text += seq.stop.flush()
        logprobs = (seq.held.release(text, cut=hit, final=finish is not None)
                    if seq.top_logprobs is not None else [])
        content, reasoning, calls = seq.route(text, final=finish is not None)
        reasoning = thought + reasoning
        if seq.tools is not None and seq.tools.called and seq.one_call:
            calls = [c for c in calls if c.index == 0]
            if finish is None:  # parallel_tool_calls=false: one call, then stop
                self._retire(r.uid)
                finish = "tool_calls"
        if finish == "length" and seq.constraint is not None and seq.constraint.finished:
            # the output is complete (the grammar allows only EOS next): not cut off
            finish = "stop"
        if finish == "stop" and seq.tools is not None and seq.tools.called:
            finish = "tool_calls"
        if self.spec.reasoning_response == "disable":
            reasoning = ""
        return protocol.Delta(rid=seq.rid, content=content, reasoning=reasoning, tokens=1,
                              tool_calls=calls, logprobs=logprobs), finish

    def _retire(self, uid: int) -> None:
        """Take a sequence out of the batch before it ends by itself, keeping its KV cache."""
        if self._is_solo(uid):
            self._solo, solo = None, self._solo
            self._remember(solo.fed, solo.cache)
            return
        kept = self.gen.remove([uid], return_prompt_caches=True)
        for cache, tokens in kept.values():
            self._remember(tokens, cache)

    def _token_logprob(self, token: int, text: str, logprobs: mx.array,
                       top: int) -> protocol.TokenLogprob:
        """The sampled token's log probability (with the text it added to the output) and
        the `top` most likely tokens'."""
        alternatives: list[protocol.TopLogprob] = []
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[ids]
            mx.eval(ids, values)
            pairs = sorted(zip(values.tolist(), ids.tolist()), reverse=True)
            for v, i in pairs:
                if v == -math.inf:  # masked out (a grammar, a -inf bias): not an alternative
                    continue
                alt_text, alt_raw = self._token_text(i)
                alternatives.append(protocol.TopLogprob(alt_text, v, alt_raw))
        return protocol.TokenLogprob(text, logprobs[token].item(), alternatives,
                                     raw=self._token_text(token)[1])

    def _token_text(self, token: int) -> tuple[str, bytes]:
        """A token's text on its own and its bytes (byte-level BPE and <0xNN> tokens)."""
        known = self._texts.get(token)
        if known is None:
            raw = token_bytes(self.tokenizer, token)
            known = self._texts[token] = (raw.decode("utf-8", "replace"), raw)
        return known

    def _inject_faults(self) -> None:
        if self.fault.delay_per_token_s:
            time.sleep(self.fault.delay_per_token_s)
        if self.fault.stall_after_tokens and (
                self.tokens_generated >= self.fault.stall_after_tokens):
            log.error("fault injection: engine stalls after %d tokens", self.tokens_generated)
            time.sleep(3600)  # a wedged step: the main thread still sends Stats
        if self.fault.oom_after_tokens and self.tokens_generated >= self.fault.oom_after_tokens:
            self.fault.oom_after_tokens = 0  # once
            raise RuntimeError("[malloc] fault injection: Attempting to allocate 1 TB")
        if self.fault.crash_after_tokens and self.tokens_generated >= self.fault.crash_after_tokens:
            log.error("fault injection: crashing after %d tokens", self.tokens_generated)
            os._exit(70)

    def recover_from_oom(self, exc: Exception) -> None:
        """An MLX allocation failure fails the batch, not the worker."""
        log.error("allocation failure; failing %d sequences: %s", self.active, exc)
        self.fail_all("out_of_memory", f"the model ran out of memory: {exc}")
        self.gen = self._new_batch()
        if self.prompt_cache is not None:
            self.prompt_cache.trim_to(n_sequences=0)  # free what we can
        self._limit_memory()  # a new BatchGenerator sets the wired limit again
        mx.clear_cache()

    def fail_all(self, code: str, message: str) -> None:
        for seq in list(self._seqs.values()):
            self.emit(protocol.Error(rid=seq.rid, code=code, message=message))
        self._seqs.clear()
        self._uid_of.clear()
        self._solo = None


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable character map, reversed (character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_exact(detok: Any) -> bool:
    """Whether a token's own bytes are what it adds to the text (mlx-lm's byte-level BPE and
    SentencePiece detokenizers), not only what the detokenizer shows at its step (the naive
    one, for WordPiece, Metaspace and other decoders)."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    return isinstance(detok, (BPEStreamingDetokenizer, SPMStreamingDetokenizer))


def continuing_detokenizer(tokenizer: Any) -> Any:
    """A streaming detokenizer for text that continues its prompt (/v1/completions). mlx-lm's
    byte-level BPE and SentencePiece detokenizers drop the first token's leading space, which
    suits the start of a chat answer; a completion of "The capital of France is" then read
    "Paris." and the prompt plus it "isParis.". Tokenizers without a known decoder
    (mlx-lm's NaiveStreamingDetokenizer) decode as the tokenizer does."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    detok = tokenizer.detokenizer
    if isinstance(detok, BPEStreamingDetokenizer):
        detok._maybe_trim_space = lambda text: text
    elif isinstance(detok, SPMStreamingDetokenizer):
        detok.trim_space = False
    return detok


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes one token stands for, for logprobs' `bytes`: byte-level BPE pieces are mapped
    back through GPT-2's byte table, SentencePiece byte tokens (<0xC3>) are that byte."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    byte_level = type(getattr(tokenizer, "_detokenizer", None)).__name__ == (
        "BPEStreamingDetokenizer")
    try:
        piece = inner.convert_ids_to_tokens(token)
    except Exception:  # ids past the tokenizer's vocabulary (padded embeddings)
        piece = None
    if not isinstance(piece, str):
        return tokenizer.decode([token]).encode()
    if token in getattr(inner, "all_special_ids", ()) or piece in getattr(
            inner, "added_tokens_encoder", {}):
        return piece.encode()
    if (m := _BYTE_TOKEN.fullmatch(piece)) is not None:
        return bytes([int(m.group(1), 16)])
    if byte_level and all(c in _BYTE_DECODER for c in piece):
        return bytes(_BYTE_DECODER[c] for c in piece)
    return piece.replace("\u2581", " ").encode()


def is_allocation_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "malloc" in text or "allocat" in text or "out of memory" in text
        or isinstance(exc, MemoryError))


def convert_weights(model: Any, load_dtype: str) -> tuple[Any, str]:
    """Apply a model's load_dtype: "auto" is float32 on the CPU backend (quantized weights
    dequantized), as stored elsewhere. Returns the model and the dtype its weights are in."""
    want = load_dtype
    if want == "auto":
        want = "float32" if describe_backend() == "cpu" else "native"
    if want == "native":
        return model, "native"
    model = dequantize_model(model)
    model.set_dtype(getattr(mx, want))
    mx.eval(model.parameters())
    return model, want


def half_copies(model: Any, spec: ModelSpec, config: dict[str, Any],
                load_dtype: str) -> tuple[int, int]:
    """Half copies of the weights for decode's products (gemv.shadow_weights): how many and
    their bytes. Only where the memory budget counts them (memory.loaded_weights_bytes):
    float32 weights loaded from 16-bit or quantized ones, with `half_weights` on; (0, 0)
    without the gemv forwarder."""
    if load_dtype != "float32" or not spec.half_weights or stored_bits(config) > 16:
        return 0, 0
    from .gemv import shadow_weights

    return shadow_weights(model)


def describe_backend() -> str:
    if mx.metal.is_available():
        return "metal"
    try:
        if mx.cuda.is_available():
            return "cuda"
    except AttributeError:
        pass
    return "cpu"


def mlx_memory() -> tuple[int, int, int]:
    return mx.get_active_memory(), mx.get_cache_memory(), mx.get_peak_memory()


def model_config(path: str) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())
