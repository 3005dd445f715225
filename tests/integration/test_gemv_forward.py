"""The gemv forwarder: built from the package's source, preloaded ahead of OpenBLAS under real
MLX, single-row products go to sgemv and every product still equals numpy's."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxrouter import gemv
from mlxrouter.config import find_system_blas

CHILD = r"""
import ctypes, json
import numpy as np
import mlx.core as mx

lib = ctypes.CDLL(None)
counters = {"sgemv": lib.mlxrouter_gemv_forwarded, "small": lib.mlxrouter_small_gemm}
for f in counters.values():
    f.restype = ctypes.c_ulong
rng = np.random.default_rng(0)

def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)

def error(got, want):
    got = np.array(got, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

errors, counts = {}, {}

def measure(name, products):
    start = {k: f() for k, f in counters.items()}
    for case, (got, want) in products.items():
        errors[case] = error(got, want)
    counts[name] = {k: f() - start[k] for k, f in counters.items()}

x, w, w2, cols, c = r(1, 96), r(80, 96), r(96, 80), r(96, 5), r(1, 80)
big = r(96, 3000)
q, k = r(2, 3, 1, 64), r(2, 3, 17, 64)
measure("one row x W^T", {
    "x @ w.T": (mx.array(x) @ mx.array(w).T, x.astype(float) @ w.T),
    "attention q @ k.T": (mx.array(q) @ mx.array(k).swapaxes(-1, -2),
                          q.astype(float) @ k.swapaxes(-1, -2)),
    "addmm beta 2": (mx.addmm(mx.array(c), mx.array(x), mx.array(w).T, alpha=0.5, beta=2.0),
                     2.0 * c + 0.5 * (x.astype(float) @ w.T)),
})
measure("one row x W, small", {
    "x @ w": (mx.array(x) @ mx.array(w2), x.astype(float) @ w2),
    "column.T @ w": (mx.array(cols)[:, 2:3].T @ mx.array(w2), cols[:, 2:3].T.astype(float) @ w2),
})
measure("one row x W, large", {"x @ big": (mx.array(x) @ mx.array(big), x.astype(float) @ big)})
rows = {}
for m in (2, 3, 4, 5, 7, 8, 13, 16):
    for n, kk in ((80, 96), (1, 7), (67, 33), (600, 200)):  # odd sizes: every tail
        a, b = r(m, kk), r(n, kk)
        rows[f"{m}x{kk} @ ({n}x{kk}).T"] = (mx.array(a) @ mx.array(b).T,
                                           a.astype(float) @ b.T.astype(float))
measure("2 to 16 rows", rows)
a17 = r(17, 96)
measure("17 rows", {"17 rows": (mx.array(a17) @ mx.array(w).T, a17.astype(float) @ w.T)})
isa = lib.mlxrouter_small_gemm_isa
isa.restype = ctypes.c_char_p
print(json.dumps({"errors": errors, "counts": counts, "isa": isa().decode()}))
"""

# cblas_sgemm called straight (through ctypes) for what MLX never passes: leading dimensions
# wider than the matrix, beta 0 over NaN, and a fork after the thread pool ran.
DIRECT_CHILD = r"""
import ctypes, json, os
import numpy as np

lib = ctypes.CDLL(None)
lib.mlxrouter_small_gemm.restype = ctypes.c_ulong
sgemm = lib.cblas_sgemm
F = ctypes.c_float
P = ctypes.POINTER(ctypes.c_float)
sgemm.argtypes = [ctypes.c_int] * 6 + [F, P, ctypes.c_int, P, ctypes.c_int, F, P, ctypes.c_int]
rng = np.random.default_rng(1)

def ptr(arr):
    return arr.ctypes.data_as(P)

def product(m, n, k, alpha, beta, pad, trans_b=True, nan_c=False):
    # Views into padded buffers: lda, ldb and ldc exceed the widths.
    a_buf = rng.standard_normal((m, k + pad)).astype(np.float32)
    b_buf = (rng.standard_normal((n, k + pad)) if trans_b
             else rng.standard_normal((k, n + pad))).astype(np.float32)
    c_buf = rng.standard_normal((m, n + pad)).astype(np.float32)
    if nan_c:
        c_buf[:, :n] = np.nan
    a, b = a_buf[:, :k], (b_buf[:, :k] if trans_b else b_buf[:, :n])
    want = alpha * (a.astype(float) @ (b.T if trans_b else b).astype(float))
    if beta:
        want += beta * c_buf[:, :n].astype(float)
    untouched = c_buf[:, n:].copy()
    sgemm(101, 111, 112 if trans_b else 111, m, n, k, alpha, ptr(a_buf), a_buf.shape[1],
          ptr(b_buf), b_buf.shape[1], beta, ptr(c_buf), c_buf.shape[1])
    got = c_buf[:, :n].astype(float)
    assert np.array_equal(c_buf[:, n:], untouched), "wrote outside C"
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

errors = {}
before = lib.mlxrouter_small_gemm()
for m, n, k in ((1, 3000, 200), (3, 1000, 300), (8, 577, 131), (16, 1200, 96), (5, 40, 9)):
    errors[f"{m}x{n}x{k} alpha 0.5 beta 2"] = product(m, n, k, 0.5, 2.0, pad=5)
    errors[f"{m}x{n}x{k} beta 0 over NaN"] = product(m, n, k, 1.0, 0.0, pad=3, nan_c=True)
errors["a B, 4 rows, beta 0 over NaN"] = product(4, 70, 33, 1.5, 0.0, pad=2, trans_b=False,
                                                 nan_c=True)
calls = lib.mlxrouter_small_gemm() - before
# alpha 0: A and B are not to be read (BLAS), so OpenBLAS computes it, not the kernel.
errors["alpha 0 beta 2"] = product(4, 80, 96, 0.0, 2.0, pad=1)
assert lib.mlxrouter_small_gemm() - before == calls
# Several threads at once (ctypes releases the GIL): one gets the pool, the others run alone.
import threading
def hammer(worst):
    for _ in range(40):
        worst.append(product(8, 2000, 150, 1.0, 0.0, pad=1))
results = [[] for _ in range(4)]
threads = [threading.Thread(target=hammer, args=(r,)) for r in results]
for t in threads:
    t.start()
for t in threads:
    t.join()
errors["4 threads at once"] = max(max(r) for r in results)
pid = os.fork()
if pid == 0:  # the child has no helper threads: it must start its own, not wait for ghosts
    os._exit(0 if product(8, 3000, 300, 1.0, 0.0, pad=0) < 1e-5 else 1)
_, status = os.waitpid(pid, 0)
print(json.dumps({"errors": errors, "calls": calls, "forked child": os.waitstatus_to_exitcode(status)}))
"""


# Half copies (gemv.shadow_weights) of float32 weights that float16 or bfloat16 holds exactly:
# the products read them and give the same bits as the float32 weights did.
SHADOW_CHILD = r"""
import ctypes, json
import numpy as np
import mlx.core as mx
import mlx.nn as nn
from mlxrouter import gemv

lib = ctypes.CDLL(None)
shadowed = lib.mlxrouter_gemv_shadow_products
shadowed.restype = ctypes.c_ulong
rng = np.random.default_rng(2)

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.f16 = nn.Linear(203, 300, bias=False)  # 203: every kernel's leftover columns
        self.bf16 = nn.Linear(99, 80)  # with a bias: addmm, beta 1
        self.f32 = nn.Linear(96, 80)

model = Model()
model.f16.weight = mx.array(rng.standard_normal((300, 203)).astype(np.float16).astype(np.float32))
# bfloat16's range, past float16's: these only bfloat16 holds exactly
bits = rng.standard_normal((80, 99)).astype(np.float32).view(np.uint32) & 0xFFFF0000
model.bf16.weight = mx.array(bits.view(np.float32) * np.float32(2.0 ** 20))
mx.eval(model.parameters())
layers = {"f16": model.f16, "bf16": model.bf16, "f32": model.f32}
inputs = {m: {name: mx.array(rng.standard_normal((m, layer.weight.shape[1])).astype(np.float32))
              for name, layer in layers.items()} for m in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16)}

def run():
    return {f"{m} rows {name}": np.array(layers[name](x)) for m, xs in inputs.items()
            for name, x in xs.items()}

before = run()
count, size = gemv.shadow_weights(model, min_size=1)
start = shadowed()
after = run()
products = shadowed() - start
# Each row of a batch's product is the row's product alone, bit for bit (a stream's tokens do
# not depend on what else is in its batch).
not_alone = [f"{m} rows {name}, row {r}" for m, xs in inputs.items() for name, x in xs.items()
             for r in range(m)
             if not np.array_equal(after[f"{m} rows {name}"][r], np.array(layers[name](x[r:r + 1]))[0])]
print(json.dumps({
    "not_alone": not_alone,
    "count": count, "size": size, "products": products,
    "differ": [case for case in before if not np.array_equal(before[case], after[case])],
    "finite": bool(all(np.isfinite(v).all() for v in after.values())),
    "again": list(gemv.shadow_weights(model, min_size=1)),
}))
"""

@pytest.fixture(autouse=True)
def fresh_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv.library remembers failed directories for the process: not across tests."""
    monkeypatch.setattr(gemv.RECIPE, "failed", {})


@pytest.fixture
def forwarder(tmp_path: Path) -> tuple[Path, str]:
    openblas = find_system_blas("openblas")
    if not sys.platform.startswith("linux") or openblas is None or gemv.compiler() is None:
        # scripts/bootstrap.sh installs OpenBLAS, and CI machines have a C compiler.
        assert not os.environ.get("CI"), "CI ran without OpenBLAS or a C compiler"
        pytest.skip("needs Linux, OpenBLAS and a C compiler")
    lib = gemv.library(tmp_path / "lib")
    assert lib is not None and lib.parent == tmp_path / "lib"
    return lib, openblas[1]


def run_child(code: str, forwarder: tuple[Path, str], **env: str) -> dict:
    lib, openblas = forwarder
    full_env = {**os.environ, "LD_PRELOAD": f"{lib}:{openblas}", **env}
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f
                     if line.startswith(("flags", "Features"))), set())


def cpu_field(name: str) -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.split(":", 1)[0].strip() == name), "")


def default_isa() -> str:
    """The kernel the forwarder picks by itself: AVX-512's 512-bit vectors on AMD from Zen 5
    (family 0x1A) on, its 256-bit ones on other AVX-512 CPUs, else AVX2, else none."""
    flags = cpu_flags()
    if {"avx512f", "avx512vl"} <= flags:
        zen5 = cpu_field("vendor_id") == "AuthenticAMD" and int(cpu_field("cpu family")) >= 26
        return "zmm" if zen5 else "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "generic"


def skip_unless_cpu_has(isa: str) -> None:
    best = default_isa()
    if isa == "avx2" and best == "generic":
        pytest.skip("no AVX2 on this CPU")
    if isa in ("avx512", "zmm") and best not in ("avx512", "zmm"):
        pytest.skip("no AVX-512 on this CPU")


@pytest.mark.parametrize(("threads", "isa"), [("1", ""), ("2", ""), ("2", "avx2"),
                                              ("2", "avx512"), ("2", "zmm"), ("2", "generic")])
def test_decode_products_skip_gemm_and_stay_exact(forwarder: tuple[Path, str], threads: str,
                                                  isa: str) -> None:
    skip_unless_cpu_has(isa)
    best = default_isa()
    # The portable kernel is off unless asked for (test_the_kernel_can_be_turned_off).
    asked = {"MLXROUTER_SMALL_GEMM_MAX_M": "16"} if (isa or best) == "generic" else {}
    report = run_child(CHILD, forwarder, MLXROUTER_GEMM_THREADS=threads,
                       MLXROUTER_SMALL_GEMM_ISA=isa, **asked)
    assert report["isa"] == (isa or best)
    for case, err in report["errors"].items():
        assert err < 1e-5, (case, err)
    counts = report["counts"]
    # x W^T with 1 to 16 rows: the small-M kernel (x @ w.T, 6 attention heads, addmm).
    assert counts["one row x W^T"]["small"] >= 8 and counts["one row x W^T"]["sgemv"] == 0
    assert counts["one row x W, small"]["small"] >= 2  # attention's weights times values
    assert counts["one row x W, large"] == {"sgemv": 1, "small": 0}
    assert counts["2 to 16 rows"]["small"] >= 32 and counts["2 to 16 rows"]["sgemv"] == 0
    assert counts["17 rows"] == {"sgemv": 0, "small": 0}  # OpenBLAS's gemm


@pytest.mark.parametrize("how", [{"MLXROUTER_SMALL_GEMM_MAX_M": "0"},
                                 {"MLXROUTER_SMALL_GEMM_ISA": "generic"}],
                         ids=["turned off", "portable kernel, not asked for"])
def test_the_kernel_can_be_turned_off(forwarder: tuple[Path, str], how: dict[str, str]) -> None:
    report = run_child(CHILD, forwarder, **how)
    for case, err in report["errors"].items():
        assert err < 1e-5, (case, err)
    assert all(c["small"] == 0 for c in report["counts"].values())
    assert report["counts"]["one row x W^T"]["sgemv"] >= 8  # one row still skips the gemm
    assert report["counts"]["2 to 16 rows"]["sgemv"] == 0


def test_strides_alpha_beta_and_fork(forwarder: tuple[Path, str]) -> None:
    report = run_child(DIRECT_CHILD, forwarder, MLXROUTER_GEMM_THREADS="2")
    for case, err in report["errors"].items():
        assert err < 1e-5, (case, err)
    assert report["calls"] == 11
    assert report["forked child"] == 0


def test_the_library_is_built_once_and_named_by_its_source(forwarder: tuple[Path, str],
                                                           tmp_path: Path) -> None:
    lib, _ = forwarder
    assert lib.name == f"libmlxrouter-gemv-{hashlib.sha256(gemv.source()).hexdigest()[:12]}.so"
    built = lib.stat().st_mtime_ns
    assert gemv.library(tmp_path / "lib") == lib  # found on disk, not built again
    assert lib.stat().st_mtime_ns == built
    assert [p.name for p in (tmp_path / "lib").iterdir()] == [lib.name]  # no build leftovers
    lib.unlink()  # a run directory cleaned under a running daemon
    assert gemv.library(tmp_path / "lib") == lib and lib.exists()


def test_no_compiler_means_no_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    assert gemv.library(tmp_path / "lib") is None
    assert "building it with /bin/false failed" in caplog.text
    assert not list((tmp_path / "lib").iterdir())
    caplog.clear()
    assert gemv.library(tmp_path / "lib") is None  # not tried again, not logged again
    assert caplog.text == ""


def test_the_first_directory_that_works_gets_the_library(forwarder: tuple[Path, str],
                                                         tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    lib, _ = forwarder  # built in tmp_path / "lib"
    (tmp_path / "home").write_text("a file where the cache directory should be")
    assert gemv.library(tmp_path / "home" / "lib", tmp_path / "lib") == lib
    assert caplog.text.count("WARNING") == 0  # the second directory served: nothing to warn of
    other = tmp_path / "run2" / "lib"  # a fresh one: built there, the failing one not retried
    found = gemv.library(tmp_path / "home" / "lib", other)
    assert found == other / lib.name and found.exists()


def test_an_unwritable_run_dir_means_no_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "/bin/true")  # a compiler is there; the directory cannot be made
    (tmp_path / "run").write_text("a file where the run directory should be")
    assert gemv.library(tmp_path / "run" / "lib") is None
    assert f"in {tmp_path / 'run' / 'lib'} failed" in caplog.text


def test_a_path_ld_preload_would_split_gets_no_library(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert gemv.library(tmp_path / "my run") is None
    assert "would not survive LD_PRELOAD" in caplog.text
    assert not (tmp_path / "my run").exists()


@pytest.mark.parametrize("isa", ["", "avx2", "avx512", "zmm"])
def test_half_copies_of_exact_weights_give_the_same_products(forwarder: tuple[Path, str],
                                                             isa: str) -> None:
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("no AVX2 with F16C on this CPU")
    skip_unless_cpu_has(isa)
    report = run_child(SHADOW_CHILD, forwarder, MLXROUTER_GEMM_THREADS="2",
                       MLXROUTER_SMALL_GEMM_ISA=isa)
    assert report["differ"] == [] and report["finite"]
    assert report["not_alone"] == []
    # float16 and bfloat16 copies; the float32-only weights (and the bias vector) get none.
    assert report["count"] == 2 and report["size"] == (300 * 203 + 80 * 99) * 2
    assert report["products"] == 2 * 10  # both layers, 1 to 16 rows
    assert report["again"] == [0, 0]  # a second call copies nothing again


def test_no_half_copies_where_no_kernel_reads_them(forwarder: tuple[Path, str]) -> None:
    report = run_child(SHADOW_CHILD, forwarder, MLXROUTER_SMALL_GEMM_MAX_M="16",
                       MLXROUTER_SMALL_GEMM_ISA="generic")  # the portable kernel
    assert report["differ"] == [] and report["count"] == 0 and report["products"] == 0
