"""The vectorized MLX CPU kernels (mlx_ops.cpp): built against the installed MLX and preloaded
into a fresh interpreter, they compute sigmoid, softmax and logsumexp (and so SiLU, attention
and a model's logits) bit for bit as MLX does without them, on each instruction set."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from mlxrouter import mlx_ops

CHILD = r"""
import ctypes, json, sys
import numpy as np
import mlx.core as mx
import mlx.nn as nn

rng = np.random.default_rng(0)
out = {}
bits = np.arange(0, 2**32, 65537, dtype=np.uint64).astype(np.uint32).view(np.float32)  # every
special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 88.0, -88.0, 88.00001, -88.00001, 1e-45,
                    3.4e38, -3.4e38, 0.34657359, -0.34657359, 1e30, -1e30], np.float32)
x = np.concatenate([rng.standard_normal(20_011).astype(np.float32) * s for s in (1, 8, 60)]
                   + [special, bits])
out["sigmoid"] = mx.sigmoid(mx.array(x))
out["silu"] = nn.silu(mx.array(x))
out["sigmoid strided"] = mx.sigmoid(mx.array(x[:40_000].reshape(200, 200)).T)
out["sigmoid short"] = mx.sigmoid(mx.array(x[:13]))
logits = rng.standard_normal((5, 3001)).astype(np.float32) * 4
edge = np.array([[1, 2, np.nan, 3], [-np.inf] * 4, [np.inf, 1, 2, 3], [0.0, -0.0, 0.0, -0.0],
                 [1e30, -1e30, 5, 88], [-100, -200, -300, -400]], np.float32)
for name, a in (("logits", logits), ("edge", edge), ("bits", bits[:65_000].reshape(65, 1000))):
    out[f"logsumexp {name}"] = mx.logsumexp(mx.array(a), axis=-1, keepdims=True)
    out[f"softmax {name}"] = mx.softmax(mx.array(a), axis=-1, precise=True)
out["logsumexp strided"] = mx.logsumexp(mx.array(logits[:, :999]).T, axis=-1)
out["logsumexp 3-d"] = mx.logsumexp(mx.array(logits[:4, :3000].reshape(2, 2, -1)[:, :, 5:]), axis=2)
out["logsumexp axis 0"] = mx.logsumexp(mx.array(logits[:, :300]), axis=0)
out["softmax strided"] = mx.softmax(mx.array(logits[:, :77]).T, axis=-1)
out["softmax broadcast rows"] = mx.softmax(mx.broadcast_to(mx.array(logits[0, :130]), (4, 130)))
out["softmax float16"] = mx.softmax(mx.array(logits).astype(mx.float16), axis=-1)
q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32))
           for s in ((2, 9, 7, 64), (2, 3, 40, 64), (2, 3, 40, 64)))
out["attention"] = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
x = mx.array(rng.standard_normal((3, 5, 9, 64)).astype(np.float32) * 3)
offsets = mx.array(np.array([0, 100, 250_000], np.int32))
freqs = mx.array(np.linspace(1, 2000, 16).astype(np.float32))
for name, a in (("", x), (" strided", x.transpose(0, 2, 1, 3))):  # (3, 9, 5, 64) views
    for trad in (False, True):
        t = " traditional" if trad else ""
        out[f"rope{name}{t}"] = mx.fast.rope(a, 64, traditional=trad, base=1e4, scale=1.0,
                                             offset=17)
        out[f"rope{name}{t} offsets"] = mx.fast.rope(a, 64, traditional=trad, base=5e5,
                                                     scale=0.25, offset=offsets)
        out[f"rope{name}{t} partial freqs"] = mx.fast.rope(a, 32, traditional=trad, base=None,
                                                           scale=1.0, offset=mx.array(5),
                                                           freqs=freqs)
# Every layer's queries and keys rotate by the same positions: the second call reuses the
# first's cos and sin table; the third (other positions) and fourth (other offsets) may not.
for i, offset in enumerate((40, 40, 41, offsets)):
    out[f"rope again {i}"] = mx.fast.rope(x * (i + 1), 64, traditional=False, base=5e5,
                                          scale=0.25, offset=offset)
out["rope 3-d"] = mx.fast.rope(x[0], 64, traditional=False, base=1e4, scale=1.0, offset=3)
out["rope float16"] = mx.fast.rope(x.astype(mx.float16), 64, traditional=False, base=1e4,
                                   scale=1.0, offset=3)
h = mx.array(rng.standard_normal((8, 1, 576)).astype(np.float32) * 3)
out["rms_norm"] = mx.fast.rms_norm(h, mx.array(rng.standard_normal(576).astype(np.float32)), 1e-5)
out["rms_norm no weight"] = mx.fast.rms_norm(h, None, 1e-6)
out["rms_norm strided"] = mx.fast.rms_norm(h[:, 0, :40].T, h[0, 0, 100:108], 1e-5)
out["rms_norm tail"] = mx.fast.rms_norm(h[:5, :, 3:103], h[7, 0, 200:300], 1e-5)  # 100 values
out["rms_norm tail no weight"] = mx.fast.rms_norm(h[:, :, :7], None, 1e-5)
out["rms_norm float16"] = mx.fast.rms_norm(h.astype(mx.float16), None, 1e-5)
# A prefill's sizes (from 65,536 values), whose rows are shared between threads.
big = rng.standard_normal((70, 1000)).astype(np.float32) * 4
out["softmax large"] = mx.softmax(mx.array(big), axis=-1, precise=True)
out["softmax large strided"] = mx.softmax(mx.array(big).T, axis=-1)
out["logsumexp large strided"] = mx.logsumexp(mx.array(big).T, axis=-1)
out["logsumexp large"] = mx.logsumexp(mx.array(big), axis=-1)  # groups of rows, shared
vocab = rng.standard_normal((8, 49_152)).astype(np.float32) * 5  # a batch step's logits
vocab[3, 7] = np.nan
vocab[5] = -np.inf
vocab[6, 100] = np.inf
out["logsumexp batch of logits"] = mx.logsumexp(mx.array(vocab), axis=-1, keepdims=True)
# argmax: the first of the largest values, or the first NaN; ties, -0 against 0, all -inf,
# -inf before the lowest float, rows shorter than a vector and with a tail.
vocab[2, 40_000:] = 99.0
vocab[1, 17:19] = 50.0
vocab[4, 9] = -0.0
vocab[4, 30_000] = 0.0
vocab[4] = np.where(vocab[4] > 0, -vocab[4], vocab[4])
edges = np.array([[1, np.nan, 2], [np.nan, 1, 2], [1, 2, np.nan], [1, np.nan, np.nan],
                  [-np.inf, np.finfo(np.float32).min, -np.inf], [-np.inf] * 3, [2, 2, 1],
                  [-0.0, 0.0, -1], [0.0, -0.0, -1], [np.inf, np.inf, 0]], np.float32)
for name, a in (("logits", mx.array(vocab)), ("edges", mx.array(edges)),
                ("strided", mx.array(vocab[:, :2000]).T),
                ("3-d", mx.array(vocab[:, :1200]).reshape(2, 4, 1200))):
    for n in (a.shape[-1], 1, 15, 17, 33):
        out[f"argmax {name} {n}"] = mx.argmax(a[..., :n], axis=-1)
out["argmax keepdims"] = mx.argmax(mx.array(vocab[:, :100]), axis=1, keepdims=True)
out["argmax one row"] = mx.argmax(mx.array(vocab[2]), axis=0)
out["argmax axis 0"] = mx.argmax(mx.array(vocab[:, :50]), axis=0)  # MLX's
out["argmax float16"] = mx.argmax(mx.array(vocab[:, :99]).astype(mx.float16), axis=-1)  # MLX's
out["argmax vmap"] = mx.vmap(lambda a: mx.argmax(a, axis=-1), in_axes=1)(mx.array(vocab[:4, :7]))
out["rms_norm large"] = mx.fast.rms_norm(mx.array(big.reshape(-1)[:69_120].reshape(120, 576)),
                                         mx.array(big[0, :576]), 1e-5)
out["rope large"] = mx.fast.rope(mx.array(rng.standard_normal((2, 9, 131, 64)).astype(np.float32)),
                                 64, traditional=False, base=1e4, scale=1.0,
                                 offset=mx.array(np.array([3, 500], np.int32)))
out["gradients"] = mx.grad(lambda a: mx.logsumexp(a, axis=-1).sum() + nn.silu(a).sum()
                           + (mx.softmax(a, axis=-1) * mx.arange(50)).sum())(
                               mx.array(logits[:2, :50]))
small = mx.array(logits[:4, :7])
out["vmap softmax over its axis"] = mx.vmap(lambda a: mx.softmax(a, axis=-1), in_axes=1)(small)
out["vmap logsumexp over its axis"] = mx.vmap(lambda a: mx.logsumexp(a, axis=-1),
                                              in_axes=1)(small)
out["jvp softmax"] = mx.jvp(lambda a: mx.softmax(a, axis=-1), [small], [small * 0.5])[1][0]
out["jvp sigmoid"] = mx.jvp(mx.sigmoid, [small], [small * 0.5])[1][0]
if len(sys.argv) > 2:  # a tiny model's logits and normalized log-probabilities
    from mlx_lm import load
    model, tok = load(sys.argv[2])
    logits_ = model(mx.array([list(range(3, 40))]))
    out["model logits"] = logits_
    out["model logprobs"] = logits_ - mx.logsumexp(logits_, axis=-1, keepdims=True)
    out["model greedy tokens"] = mx.argmax(out["model logprobs"], axis=-1)
np.savez(sys.argv[1], **{k: np.array(v.astype(mx.float32)) for k, v in out.items()})
lib = ctypes.CDLL(None)
try:
    lib.mlxrouter_mlx_ops.restype = ctypes.c_char_p
    lib.mlxrouter_mlx_ops_count.restype = ctypes.c_ulong
    kernels = lib.mlxrouter_mlx_ops().decode()
    counts = [lib.mlxrouter_mlx_ops_count(i) for i in range(7)]
    lib.mlxrouter_mlx_ops_shared.restype = ctypes.c_ulong
    shared = lib.mlxrouter_mlx_ops_shared()
    lib.mlxrouter_mlx_ops_rope_table_hits.restype = ctypes.c_ulong
    rope_hits = lib.mlxrouter_mlx_ops_rope_table_hits()
except AttributeError:
    kernels, counts, shared, rope_hits = None, None, None, None
print(json.dumps({"kernels": kernels, "counts": counts, "shared": shared,
                  "rope_hits": rope_hits}))
"""


# Attention for one query position (decode), as mlx-lm calls it: queries (B, Hq, 1, D) against
# a cache's keys and values (B, Hkv, T, D), sliced out of a longer buffer.
ATTENTION_CHILD = r"""
import ctypes, json, sys
import numpy as np
import mlx.core as mx

rng = np.random.default_rng(1)
def arr(*shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))
out, same = {}, {}
B, T = 3, 37
q, q8 = arr(B, 6, 1, 64), arr(B, 8, 1, 128)
k, v = arr(B, 2, 64, 64)[:, :, :T], arr(B, 2, 64, 64)[:, :, :T]
pad = [0, 5, 36]  # left padding of each sequence: the third has one key
keep = mx.array(np.arange(T)[None, None, None, :] >= np.array(pad)[:, None, None, None])
sdpa = mx.fast.scaled_dot_product_attention
out["no mask"] = sdpa(q, k, v, scale=0.125)
out["causal"] = sdpa(q, k, v, scale=0.125, mask="causal")
out["left padding"] = sdpa(q, k, v, scale=0.125, mask=keep)
out["additive"] = sdpa(q, k, v, scale=0.125, mask=arr(B, 6, 1, T))
out["one head per group"] = sdpa(arr(B, 2, 1, 64), k, v, scale=0.125, mask=keep)
out["8 heads per group, 128 wide, values 64"] = sdpa(q8, arr(B, 1, T, 128), arr(B, 1, T, 64),
                                                       scale=0.09)
out["keys transposed"] = sdpa(q, arr(B, 2, 64, T).swapaxes(-1, -2), v, scale=0.125)
none = mx.array(np.zeros((B, 1, 1, T), bool))
out["every key masked"] = sdpa(q, k, v, scale=0.125, mask=none)
out["two queries"] = sdpa(arr(B, 6, 2, 64), k, v, scale=0.125)  # MLX's: not one query
out["float16"] = sdpa(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16),
                      scale=0.125).astype(mx.float32)
# Each padded sequence alone, without its padding or a mask, gives its batch row exactly.
for b in range(B):
    alone = sdpa(q[b:b + 1], k[b:b + 1, :, pad[b]:], v[b:b + 1, :, pad[b]:], scale=0.125)
    same[b] = bool(mx.array_equal(alone[0], out["left padding"][b]).item())
# Enough work to be shared between threads: 8 sequences of up to 300 keys.
qb, kb, vb = arr(8, 9, 1, 64), arr(8, 3, 300, 64), arr(8, 3, 300, 64)
padb = [0, 1, 17, 100, 299, 3, 250, 64]
keepb = mx.array(np.arange(300)[None, None, None, :] >= np.array(padb)[:, None, None, None])
out["8 sequences"] = sdpa(qb, kb, vb, scale=0.125, mask=keepb)
for b in (2, 4):
    alone = sdpa(qb[b:b + 1], kb[b:b + 1, :, padb[b]:], vb[b:b + 1, :, padb[b]:], scale=0.125)
    same[f"8 sequences {b}"] = bool(mx.array_equal(alone[0], out["8 sequences"][b]).item())
# Prefills: several query positions, the last Tq of Tk (a cache before them).
P, Tk = 9, 21
qp = arr(B, 6, P, 64)
kp, vp = arr(B, 2, 32, 64)[:, :, :Tk], arr(B, 2, 32, 64)[:, :, :Tk]
out["prefill causal"] = sdpa(qp, kp[:, :, :P], vp[:, :, :P], scale=0.125, mask="causal")
out["prefill causal after a cache"] = sdpa(qp, kp, vp, scale=0.125, mask="causal")
# Left padding as mlx-lm's batch cache masks it: causal, and no key before the padding; the
# padding's own positions see no key at all.
pos = np.arange(Tk - P, Tk)[:, None] >= np.arange(Tk)[None, :]
ppad = [0, 4, 15]
left = np.arange(Tk)[None, :] >= np.array(ppad)[:, None]
keep_p = mx.array(pos[None, None] & left[:, None, None, :])
out["prefill left padding"] = sdpa(qp, kp, vp, scale=0.125, mask=keep_p)
out["prefill additive"] = sdpa(qp, kp, vp, scale=0.125, mask=arr(B, 6, P, Tk))
out["prefill 8 heads per group"] = sdpa(arr(B, 8, 5, 128), arr(B, 1, Tk, 128), arr(B, 1, Tk, 64),
                                        scale=0.09, mask="causal")
qs8 = arr(8, 9, 40, 64)  # shared between threads
out["prefill 8 sequences"] = sdpa(qs8, arr(8, 3, 40, 64), arr(8, 3, 40, 64), scale=0.125,
                                  mask="causal")
# A prefill cut in two (a prompt cache) gives what it gives whole, bit for bit, and a
# sequence's rows of a left-padded batch are the sequence alone.
whole = out["prefill causal after a cache"]
first = sdpa(qp[:, :, :4], kp[:, :, :Tk - P + 4], vp[:, :, :Tk - P + 4], scale=0.125,
             mask="causal")
rest = sdpa(qp[:, :, 4:], kp, vp, scale=0.125, mask="causal")
same["prefill in two"] = bool(mx.array_equal(mx.concatenate([first, rest], axis=2),
                                             whole).item())
for b in (1, 2):
    s0 = max(ppad[b] - (Tk - P), 0)  # the first position that is not padding
    alone = sdpa(qp[b:b + 1, :, s0:], kp[b:b + 1, :, ppad[b]:], vp[b:b + 1, :, ppad[b]:],
                 scale=0.125, mask="causal")
    same[f"prefill {b}"] = bool(mx.array_equal(alone[0], out["prefill left padding"][b, :, s0:]
                                               ).item())
# Empty heads are MLX's to judge: no query heads is an error, heads of size 0 weigh nothing.
try:
    mx.eval(sdpa(mx.zeros((1, 0, 3, 16)), mx.zeros((1, 2, 5, 16)), mx.zeros((1, 2, 5, 16)),
                 scale=1.0))
    same["no query heads refused"] = False
except ValueError:
    same["no query heads refused"] = True
out["heads of size 0"] = sdpa(mx.zeros((1, 2, 3, 0)), mx.zeros((1, 2, 5, 0)), arr(1, 2, 5, 16),
                              scale=1.0, mask="causal")
np.savez(sys.argv[1], **{k_: np.array(v_.astype(mx.float32)) for k_, v_ in out.items()})
lib = ctypes.CDLL(None)
try:
    lib.mlxrouter_mlx_ops_count.restype = ctypes.c_ulong
    count = lib.mlxrouter_mlx_ops_count(3)
except AttributeError:
    count = None
print(json.dumps({"attention": count, "alone equals batch": same}))
"""


@pytest.fixture(autouse=True)
def fresh_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlx_ops.library remembers failed directories for the process: not across tests."""
    monkeypatch.setattr(mlx_ops.RECIPE, "failed", {})


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f
                     if line.startswith("flags")), set())


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (not sys.platform.startswith("linux") or platform.machine() != "x86_64"
            or mlx_ops.compiler() is None or not {"avx2", "fma"} <= cpu_flags()):
        # CI machines are x86-64 Linux with a C++ compiler (scripts/bootstrap.sh).
        assert not os.environ.get("CI"), "CI ran without x86-64 Linux, AVX2 or a C++ compiler"
        pytest.skip("needs Linux on x86-64 with AVX2 and a C++ compiler")
    lib = mlx_ops.library(tmp_path_factory.mktemp("ops") / "lib")
    assert lib is not None
    return lib


def run_child(tmp_path: Path, name: str, *args: str, code: str = CHILD,
              **env: str) -> tuple[dict, dict]:
    out = tmp_path / f"{name}.npz"
    full_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run([sys.executable, "-c", code, str(out), *args],
                          env={**full_env, **env}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as arrays:
        return json.loads(proc.stdout), {k: arrays[k] for k in arrays.files}


def assert_bit_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, expected in want.items():
        actual = got[name]
        assert actual.shape == expected.shape, name
        same = ((actual.view(np.uint32) == expected.view(np.uint32))
                | (np.isnan(actual) & np.isnan(expected)))
        assert same.all(), (name, actual[~same][:5], expected[~same][:5])


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_kernels_give_mlx_own_results_bit_for_bit(kernels: Path, tmp_path: Path,
                                                   tiny_model: Path, isa: str) -> None:
    if isa == "avx512" and "avx512f" not in cpu_flags():
        pytest.skip("no AVX-512 on this CPU")
    report, reference = run_child(tmp_path, "mlx", str(tiny_model))
    assert report["kernels"] is None  # nothing preloaded
    env = {"LD_PRELOAD": str(kernels)}
    if isa == "avx2":
        env["MLXROUTER_FAST_OPS"] = "avx2"
    # Attention is ours only up to rounding (the test below): left to MLX here.
    report, ours = run_child(tmp_path, isa, str(tiny_model), **env,
                             MLXROUTER_FAST_OPS_EXCEPT="attention")
    assert report["kernels"] == isa
    sigmoid, softmax, logsumexp, attention, rope, rms_norm, argmax = report["counts"]
    # Ours ran, not MLX's under our name: 4 sigmoids, the gradient's, the jvp's and the 2
    # layers' SiLU; 5 softmaxes, the attention, the gradient's, the jvp's and the 2 layers'
    # attention (the float16 one is MLX's, and so is the vmap's over the second-last axis);
    # 5 logsumexps over the last axis, the vmap's and the model's log-probabilities (the
    # gradient needs no logsumexp's value, so none is computed for it); 12 ropes of 4-d
    # float32 arrays, 4 more of them at the same or other positions and the 2 layers' queries
    # and keys (the 3-d and float16 ones are MLX's).
    # And the large ones: 2 softmaxes, 3 logsumexps, an RMS norm and a rope.
    assert (sigmoid, softmax, logsumexp) == (4 + 1 + 1 + 2, 5 + 1 + 1 + 1 + 2 + 2,
                                             5 + 1 + 1 + 3)
    assert (attention, rope) == (0, 12 + 4 + 4 + 1)
    # Reused tables: "rope again 1" (the positions of the call before it) and the model's 3
    # calls after its first; every other call built its own, and all agree with MLX below.
    assert report["rope_hits"] == 1 + 3
    # 5 float32 RMS norms and the model's 2 per layer and its last (float16 is MLX's).
    assert rms_norm == 5 + 5 + 1
    # 4 arrays x 5 lengths of float32 argmaxes over the last axis, keepdims, one row, the
    # vmap's and the model's greedy tokens (the one over axis 0 and the float16 one are MLX's).
    assert argmax == 4 * 5 + 1 + 1 + 1 + 1
    # The large ones (and the long sigmoids) were shared between threads: the same bits.
    assert report["shared"] >= 5 + 3
    assert_bit_identical(ours, reference)
    assert np.isfinite(ours["model logits"]).all() and ours["model logits"].std() > 0
    # With our attention too: the attention and the 2 layers' (a prefill of 37 tokens) are
    # ours, and so no longer softmaxes; what they feed is MLX's up to rounding.
    report, all_ours = run_child(tmp_path, f"{isa}-all", str(tiny_model), **env)
    sigmoid, softmax, logsumexp, attention, rope, rms_norm, argmax = report["counts"]
    assert (softmax, attention) == (5 + 1 + 1 + 1 + 2 + 2 - 3, 3)
    fed = ("attention", "model logits", "model logprobs")
    assert_bit_identical({k: v for k, v in all_ours.items() if k not in fed},
                         {k: v for k, v in reference.items() if k not in fed})
    for name in fed:
        np.testing.assert_allclose(all_ours[name], reference[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)



@pytest.mark.parametrize(("isa", "threads"), [("avx512", "2"), ("avx2", "2"), ("avx512", "1")])
def test_decode_attention_is_mlx_own_up_to_rounding(kernels: Path, tmp_path: Path,
                                                    isa: str, threads: str) -> None:
    if isa == "avx512" and "avx512f" not in cpu_flags():
        pytest.skip("no AVX-512 on this CPU")
    report, reference = run_child(tmp_path, "mlx", code=ATTENTION_CHILD)
    assert report["attention"] is None
    env = {"LD_PRELOAD": str(kernels), "MLXROUTER_ATTENTION_THREADS": threads}
    if isa == "avx2":
        env["MLXROUTER_FAST_OPS"] = "avx2"
    report, ours = run_child(tmp_path, isa, code=ATTENTION_CHILD, **env)
    # Ours computed the 10 float32 attentions of one query or more, the 5 sequences alone
    # and the 6 prefills, 2 halves and 2 sequences alone; the float16 one is MLX's. Dot
    # products are summed in another order: within a few units in the last place. With every
    # key masked MLX weighs all keys equally (its masked scores are all the lowest float), and
    # so does ours.
    assert report["attention"] == 10 + 5 + 6 + 2 + 2
    assert ours.keys() == reference.keys()
    for name, expected in reference.items():
        np.testing.assert_allclose(ours[name], expected, rtol=2e-5, atol=2e-6, err_msg=name)
    assert_bit_identical({k: ours[k] for k in ("float16", "heads of size 0")},
                         {k: reference[k] for k in ("float16", "heads of size 0")})
    # A masked key counts for nothing: a sequence's row of a left-padded batch is the
    # sequence alone, bit for bit (so a request decodes alike alone and in a batch).
    # The 8 sequences' items are shared between threads (MLXROUTER_ATTENTION_THREADS).
    assert report["alone equals batch"] == {
        "0": True, "1": True, "2": True, "8 sequences 2": True, "8 sequences 4": True,
        "prefill in two": True, "prefill 1": True, "prefill 2": True,
        "no query heads refused": True}


def test_kernels_can_be_turned_off(kernels: Path, tmp_path: Path) -> None:
    report, reference = run_child(tmp_path, "mlx")
    report, off = run_child(tmp_path, "off", LD_PRELOAD=str(kernels), MLXROUTER_FAST_OPS="0")
    assert report == {"kernels": "off", "counts": [0] * 7, "shared": 0,
                      "rope_hits": 0}
    assert_bit_identical(off, reference)



def test_kernels_can_be_left_to_mlx_one_by_one(kernels: Path, tmp_path: Path,
                                               tiny_model: Path) -> None:
    report, reference = run_child(tmp_path, "mlx", str(tiny_model))
    report, some = run_child(tmp_path, "some", str(tiny_model), LD_PRELOAD=str(kernels),
                             MLXROUTER_FAST_OPS_EXCEPT="softmax,rope,rms_norm,attention,nonsense")
    sigmoid, softmax, logsumexp, attention, rope, rms_norm, argmax = report["counts"]
    assert softmax == rope == rms_norm == attention == 0 and sigmoid > 0 and logsumexp > 0
    assert_bit_identical(some, reference)

def test_the_library_is_named_by_its_source_and_the_mlx_it_links(kernels: Path,
                                                                  tmp_path: Path) -> None:
    here = Path(mlx_ops.__file__).parent
    source = b"".join((here / name).read_bytes() for name in (mlx_ops.SOURCE, *mlx_ops.HEADERS))
    salt = f"\0mlx {metadata.version('mlx')} at {mlx_ops.mlx_dir()}".encode()
    assert kernels.name == (
        f"libmlxrouter-mlx-ops-{hashlib.sha256(source + salt).hexdigest()[:12]}.so")
    assert f"{mlx_ops.mlx_dir()}/lib" in subprocess.run(
        ["readelf", "-d", str(kernels)], capture_output=True, text=True).stdout  # its rpath
    assert mlx_ops.library(kernels.parent) == kernels  # found, not built again


def test_no_cxx_compiler_means_no_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    if mlx_ops.RECIPE.unsupported():
        pytest.skip(mlx_ops.RECIPE.unsupported())
    monkeypatch.setenv("CXX", "/bin/false")
    assert mlx_ops.library(tmp_path / "lib") is None
    assert "no vectorized MLX CPU kernels, workers get MLX's own" in caplog.text
    assert "building it with /bin/false failed" in caplog.text
    assert not list((tmp_path / "lib").iterdir())


def test_off_x86_there_is_no_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(mlx_ops.platform, "machine", lambda: "aarch64")
    assert mlx_ops.library(tmp_path / "lib") is None
    assert "only built for Linux on x86-64" in caplog.text
    assert not (tmp_path / "lib").exists()
