"""Generation on mlx-vlm: images and PDFs in, the same protocol messages out as TextEngine.

Runs in a vision worker, on its engine thread only (MLX streams are thread-bound). The worker
calls load / submit / cancel / step exactly as it calls engine.TextEngine. mlx-vlm's batch
generator takes one sampler for a whole batch, so this engine runs one sequence at a time and
queues the rest; each request is prepared (images decoded, PDF pages rendered, chat template,
processor) before it is queued, so a bad file or a too-long prompt is an Error before
Started, i.e. a real HTTP 400, even while another request is generating.

Untrusted files are decoded in a child process of this worker (media.decode_all), never in the
daemon and never on the engine thread itself: a malicious file fails its request with a 400,
at worst after `media_decode_timeout_s`, and never the gateway or this worker. The engine
thread does not wait for a decode either: a few threads of this worker wait for the children
(`DECODERS` at once), and a request joins the queue when its files are decoded, so a file that
takes the whole timeout to fail holds up no other request, with or without files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_logits_processors
from mlx_vlm import load as vlm_load
from mlx_vlm import stream_generate
from mlx_vlm.prompt_utils import apply_chat_template
from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

from . import protocol
from .chat import StopText
from .config import ModelSpec
from .engine import (Emit, FaultPlan, _max_context, check_logit_bias, convert_weights,
                     fit_max_tokens, half_copies, is_allocation_failure, make_sampler)
from .errors import InvalidRequest, RouterError
from .media import decode_all
from .vision import refuse_for_vision

log = logging.getLogger(__name__)

# Requests whose files are decoded at once, each in a child process (media.decode_all); more
# wait their turn. Each child ends by media_decode_timeout_s, so files that take the whole
# deadline can hold up other requests' files, never requests without files.
DECODERS = 4
# How long an engine with nothing to generate waits for a decode before it looks at its inbox.
DECODE_POLL_S = 0.02


def decode_request_media(media: list[protocol.Media]) -> list[list[Any]]:
    """The PIL images of each medium: decoded in a child process under the request's deadline,
    with every limit checked before the decode or render that would cross it."""
    timeout_s = media[0].decode_timeout_s if media else 0
    return decode_all(media, timeout_s or None)


def expand_media(messages: list[dict[str, Any]], media: list[protocol.Media],
                 decoded: list[list[Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with each {"type": "image", "media": i} part replaced by one image part per
    image (a PDF gives one per page), and the PIL images in prompt order; `decoded` holds
    each medium's images (decode_request_media)."""
    images: list[Any] = []
    out = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            if part.get("type") != "image" or "media" not in part:
                parts.append(part)
                continue
            index = part["media"]
            if not 0 <= index < len(media):
                raise InvalidRequest(f"image part refers to media {index}, but the request "
                                     f"carries {len(media)}")
            images += decoded[index]
            parts += [{"type": "image"} for _ in decoded[index]]
        out.append({**msg, "content": parts})
    return out, images


# ---- the engine


def _think_tokens(tokenizer: Any) -> tuple[int, int] | None:
    """The ids of <think> and </think> when both are single tokens of the vocabulary (as
    mlx-lm's TokenizerWrapper finds them for text models), else None."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a processor without a vocabulary to read: no reasoning split
        return None
    start, end = vocab.get("<think>"), vocab.get("</think>")
    return (int(start), int(end)) if start is not None and end is not None else None


class _Job:
    """One request: its prepared inputs until it runs, then its generator."""

    def __init__(self, req: protocol.Request, inputs: dict[str, Any], prompt_tokens: int,
                 sampler: Any, processors: list, max_tokens: int, received_at: float) -> None:
        self.req = req
        self.max_tokens = max_tokens
        self.rid = req.rid
        self.request_id = req.request_id or "-"
        self.inputs = inputs
        self.prompt_tokens = prompt_tokens
        self.sampler = sampler
        self.processors = processors
        self.stop = StopText(req.sampling.stop)
        self.ids: list[int] = []  # the content tokens generated, and how much of their text
        self.shown = 0            # is out
        self.thinking = False  # inside <think>...</think> (reasoning models)
        self.reasoning_ids: list[int] = []
        self.reasoning_shown = 0
        self.completion_tokens = 0
        self.gen: Iterator[Any] | None = None
        self.received_at = received_at  # when the engine took the Request (End.elapsed_s)


class VisionEngine:
    """TextEngine's interface (load, submit, cancel, step, active, steps) on mlx-vlm."""

    def __init__(self, spec: ModelSpec, emit: Emit, fault: FaultPlan,
                 memory_limit: int = 0) -> None:
        self.spec = spec
        self.emit = emit
        self.fault = fault
        self.memory_limit = memory_limit
        self.steps = 0
        self.tokens_generated = 0
        self.max_context = 0
        self.weights_bytes = 0
        self.half_copies = (0, 0)
        self.load_dtype = "native"
        self._queue: deque[_Job] = deque()
        self._current: _Job | None = None
        # rid -> (request, its decode, when it came): requests whose files are being decoded
        self._decoding: dict[int, tuple[protocol.Request, Future, float]] = {}
        self._decoders: ThreadPoolExecutor | None = None

    @property
    def active(self) -> int:
        return len(self._queue) + (self._current is not None) + len(self._decoding)

    def load(self) -> None:
        if self.fault.load_delay_s:
            time.sleep(self.fault.load_delay_s)
        if self.fault.fail_load:
            raise RuntimeError("fault injection: load failed")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the processor would probe the Hub
        self.model, self.processor = vlm_load(self.spec.path)
        config = json.loads((Path(self.spec.path) / "config.json").read_text())
        self.config = config
        self.model, self.load_dtype = convert_weights(self.model, self.spec.load_dtype)
        self.max_context = _max_context(self.spec, config)
        self.half_copies = half_copies(self.model, self.spec, config, self.load_dtype)
        self.weights_bytes = (sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
                              + self.half_copies[1])
        self.vocab_size = int(config.get("vocab_size")
                              or config.get("text_config", {}).get("vocab_size") or 0) or 2**31
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.think = _think_tokens(self.tokenizer)
        self._limit_memory()

    def _limit_memory(self) -> None:
        if not self.memory_limit:
            return
        spare = max(0, self.memory_limit - self.weights_bytes)
        mx.set_cache_limit(max(64 * 2**20, spare // 2))

    # ---- per request

    def submit(self, req: protocol.Request) -> None:
        """Queues the request, or starts decoding its files and queues it once they are."""
        received_at = time.monotonic()
        if req.messages is not None and req.media:
            if not self._guarded(req, self._refuse_unsupported, req):
                return
            if self._decoders is None:
                self._decoders = ThreadPoolExecutor(DECODERS, thread_name_prefix="media")
            self._decoding[req.rid] = (
                req, self._decoders.submit(decode_request_media, req.media), received_at)
            return
        self._guarded(req, self._admit, req, [], received_at)

    def _collect_decoded(self, block: bool) -> None:
        """Queues (or fails) the requests whose files are decoded; with `block`, first waits
        up to DECODE_POLL_S for one when any is still decoding."""
        if not self._decoding:
            return
        if block:
            wait([f for _, f, _ in self._decoding.values()], timeout=DECODE_POLL_S,
                 return_when=FIRST_COMPLETED)
        for rid, (req, future, received_at) in list(self._decoding.items()):
            if future.done():
                del self._decoding[rid]
                self._guarded(req, self._admit_decoded, req, future, received_at)

    def _admit_decoded(self, req: protocol.Request, future: Future, received_at: float) -> None:
        self._admit(req, future.result(), received_at)  # the decode's 400 fails this request

    def _guarded(self, req: protocol.Request, fn: Callable[..., None], *args: Any) -> bool:
        """Per-request code: whatever goes wrong in fn fails this request (an Error, False),
        never the worker."""
        try:
            fn(*args)
            return True
        except RouterError as exc:  # in the worker's log too: a decode timeout, a dead decoder
            log.info("request refused request_id=%s rid=%d code=%s: %s", req.request_id or "-",
                     req.rid, exc.code, exc.message)
            self.emit(protocol.Error(rid=req.rid, code=exc.code, message=exc.message,
                                     param=exc.param))
        except Exception as exc:  # processor, template, tokenizer: the request's fault
            log.warning("request rejected request_id=%s rid=%d: %r", req.request_id or "-",
                        req.rid, exc)
            self.emit(protocol.Error(rid=req.rid, code="invalid_request",
                                     message=f"the request could not be processed: {exc}",
                                     param="messages" if req.messages is not None
                                     else "prompt"))
        return False

    def _admit(self, req: protocol.Request, decoded: list[list[Any]],
               received_at: float) -> None:
        started = time.monotonic()
        self._refuse_unsupported(req)
        inputs, images = self._inputs(req, decoded)
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        max_tokens = fit_max_tokens(req.sampling, prompt_tokens, self.max_context,
                                    "prompt tokens (images included)",
                                    "messages" if req.messages is not None else "prompt")
        job = _Job(req, inputs, prompt_tokens, make_sampler(req.sampling),
                   self._processors(req.sampling, max_tokens), max_tokens, received_at)
        if self.think is not None:  # a template that opens the block itself starts inside it
            tail = [int(t) for t in inputs["input_ids"].reshape(-1).tolist()[-8:]]
            opened = [t for t in tail if t in self.think]
            job.thinking = bool(opened) and opened[-1] == self.think[0]
        self._queue.append(job)
        log.info("request started request_id=%s rid=%d prompt_tokens=%d images=%d "
                 "decode_ms=%.0f prepare_ms=%.0f max_tokens=%d queued=%d", job.request_id,
                 req.rid, prompt_tokens, images, (started - received_at) * 1000,
                 (time.monotonic() - started) * 1000, max_tokens,
                 len(self._queue) - 1 + (self._current is not None))
        self.emit(protocol.Started(rid=req.rid, prompt_tokens=prompt_tokens))

    @staticmethod
    def _refuse_unsupported(req: protocol.Request) -> None:
        """What this engine cannot honour is a 400 naming it, never silently ignored (the
        gateway checks first: vision.refuse_for_vision)."""
        refuse_for_vision(req)

    def _inputs(self, req: protocol.Request, decoded: list[list[Any]]
                ) -> tuple[dict[str, Any], int]:
        """Token ids, pixels and the model's extra inputs (e.g. image_grid_thw)."""
        images: list[Any] = []
        if req.messages is not None:
            messages, images = expand_media(req.messages, req.media, decoded)
            prompt = apply_chat_template(self.processor, self.model.config, messages,
                                         num_images=len(images))
        elif isinstance(req.prompt, str):
            prompt = req.prompt
        elif req.prompt:
            bad = [t for t in req.prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                     f"({self.vocab_size} tokens)", param="prompt")
            ids = mx.array([list(req.prompt)])
            return {"input_ids": ids, "mask": mx.ones_like(ids)}, 0
        else:
            raise InvalidRequest("request has neither messages nor prompt")
        raw = prepare_inputs(
            self.processor, images=images or None, prompts=prompt,
            image_token_index=getattr(self.model.config, "image_token_index", None),
            add_special_tokens=should_add_special_tokens(self.model.config.model_type,
                                                         self.processor))
        if images and raw.get("pixel_values") is None:
            # a model served through mlx-vlm whose processor has no image processor (a text
            # model with supports_vision = true): the images would be dropped without a word
            raise InvalidRequest(f"model '{self.spec.id}' cannot read images: its processor "
                                 f"has no image processor (is supports_vision set for a text "
                                 f"model?)", param="messages")
        inputs = {k: v for k, v in raw.items() if k != "attention_mask"}
        inputs["mask"] = raw.get("attention_mask")
        if inputs["input_ids"].size == 0:
            raise InvalidRequest("the prompt is empty")
        return inputs, len(images)

    def _processors(self, p: protocol.SamplingParams, max_tokens: int) -> list:
        check_logit_bias(p.logit_bias, self.vocab_size)
        return make_logits_processors(
            logit_bias=p.logit_bias or None,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1.0 else None,
            presence_penalty=p.presence_penalty or None, presence_context_size=max_tokens,
            frequency_penalty=p.frequency_penalty or None, frequency_context_size=max_tokens)

    def cancel(self, rid: int) -> None:
        if rid in self._decoding:  # its child runs on to its deadline; its images are dropped
            req, future, received_at = self._decoding.pop(rid)
            future.cancel()  # one still waiting for a decoder never starts
            log.info("request ended request_id=%s rid=%d finish=cancelled while decoding",
                     req.request_id or "-", rid)
            self.emit(protocol.End(rid=rid, finish_reason="cancelled", prompt_tokens=0,
                                   completion_tokens=0,
                                   elapsed_s=time.monotonic() - received_at))
            return
        job = self._current if self._current is not None and self._current.rid == rid else None
        if job is None:
            job = next((j for j in self._queue if j.rid == rid), None)
            if job is None:
                return  # unknown or already finished: ignored by the protocol
            self._queue.remove(job)
        self._end(job, "cancelled")

    def _end(self, job: _Job, finish_reason: str) -> None:
        if job is self._current:
            self._current = None
            if job.gen is not None:
                job.gen.close()  # runs mlx-vlm's cleanup (wired limit, cache)
        log.info("request ended request_id=%s rid=%d finish=%s completion_tokens=%d",
                 job.request_id, job.rid, finish_reason, job.completion_tokens)
        self.emit(protocol.End(rid=job.rid, finish_reason=finish_reason,
                               prompt_tokens=job.prompt_tokens,
                               completion_tokens=job.completion_tokens,
                               elapsed_s=time.monotonic() - job.received_at))

    # ---- one token of the current sequence

    def step(self) -> None:
        self._collect_decoded(block=self._current is None and not self._queue)
        if self._current is None:
            if not self._queue:
                return
            self._current = self._queue.popleft()
        job = self._current
        if job.gen is None:
            job.gen = self._generate(job)
            job.inputs = {}  # the generator holds them now
            result = self._prefill(job)
            if job is not self._current:
                return  # the prefill failed this request alone
        else:
            result = next(job.gen, None)
        self.steps += 1
        if result is None:  # mlx-vlm ended without a final result: count it as length
            self._end(job, "length")
            return
        new_tokens = result.generation_tokens - job.completion_tokens
        job.completion_tokens = result.generation_tokens
        self.tokens_generated += new_tokens
        finish = result.finish_reason
        if finish is None and result.token is not None:
            self._take(job, int(result.token))  # (the final result repeats one, or is EOS)
        reasoning = self._new_reasoning(job, final=finish is not None)
        text, hit = job.stop.feed(self._new_text(job, final=finish is not None))
        if hit:
            finish = "stop"
        elif finish is not None:
            text += job.stop.flush()
        if self.spec.reasoning_response == "disable":
            reasoning = ""
        self.emit(protocol.Step(deltas=[protocol.Delta(rid=job.rid, content=text,
                                                       reasoning=reasoning,
                                                       tokens=new_tokens)]))
        if result.finish_reason is not None:
            next(job.gen, None)  # lets mlx-vlm run its own clean-up after the last token
        if finish is not None:
            self._end(job, finish)
        self._inject_faults()

    def _take(self, job: _Job, token: int) -> None:
        """A generated token: a reasoning marker switches where the next ones go (reasoning
        models: the text between <think> and </think> is reasoning, never content)."""
        if self.think is not None and token in self.think:
            job.thinking = token == self.think[0]
        elif job.thinking:
            job.reasoning_ids.append(token)
        else:
            job.ids.append(token)

    def _new_reasoning(self, job: _Job, final: bool) -> str:
        if not job.reasoning_ids:
            return ""
        new, job.reasoning_shown = self._decoded_since(job.reasoning_ids, job.reasoning_shown,
                                                       final)
        return new

    def _new_text(self, job: _Job, final: bool) -> str:
        new, job.shown = self._decoded_since(job.ids, job.shown, final)
        return new

    def _decoded_since(self, ids: list[int], shown: int, final: bool) -> tuple[str, int]:
        """The text the last token added to `ids`, and how much is out now. mlx-vlm's
        streaming detokenizer lets text out only at a token that starts with a space: output
        without spaces (code, CJK, "oooo") streamed nothing, and stop strings were found a
        word late or at max_tokens. So the tokens are decoded whole each step (a few hundred
        at most) and what is new goes out, but for an unfinished character at the end."""
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not final:
            full = full.rstrip("\ufffd")
        return full[shown:], max(shown, len(full))

    def _prefill(self, job: _Job) -> Any:
        """The first step runs the vision tower over this request's images: what fails there
        is this request's input, so it fails this request only (an allocation failure still
        goes to the worker's out-of-memory handling)."""
        try:
            return next(job.gen, None)
        except Exception as exc:
            if is_allocation_failure(exc):
                raise
            log.warning("prefill failed request_id=%s rid=%d: %r", job.request_id, job.rid, exc)
            self._current = None
            self.emit(protocol.Error(rid=job.rid, code="invalid_request",
                                     message=f"the model could not process this input: {exc}"))
            return None

    def _generate(self, job: _Job) -> Iterator[Any]:
        inputs = dict(job.inputs)
        return stream_generate(
            self.model, self.processor, "", max_tokens=job.max_tokens,
            sampler=job.sampler, logits_processors=job.processors, **inputs)

    def _inject_faults(self) -> None:
        if self.fault.delay_per_token_s:
            time.sleep(self.fault.delay_per_token_s)
        if self.fault.crash_after_tokens and self.tokens_generated >= self.fault.crash_after_tokens:
            log.error("fault injection: crashing after %d tokens", self.tokens_generated)
            os._exit(70)

    def recover_from_oom(self, exc: Exception) -> None:
        """An MLX allocation failure fails the running and queued requests, not the worker."""
        log.error("allocation failure; failing %d requests: %s", self.active, exc)
        self.fail_all("out_of_memory", f"the model ran out of memory: {exc}")
        mx.clear_cache()

    def fail_all(self, code: str, message: str) -> None:
        jobs = ([self._current] if self._current is not None else []) + list(self._queue)
        if self._current is not None and self._current.gen is not None:
            try:
                self._current.gen.close()
            except Exception:  # a generator that failed mid-step may fail to close too
                log.debug("closing a failed generation raised", exc_info=True)
        self._current = None
        self._queue.clear()
        rids = [job.rid for job in jobs] + list(self._decoding)
        for _, future, _ in self._decoding.values():
            future.cancel()
        self._decoding.clear()
        for rid in rids:
            self.emit(protocol.Error(rid=rid, code=code, message=message))
