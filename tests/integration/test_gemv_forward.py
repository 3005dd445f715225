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

forwarded = ctypes.CDLL(None).mlxrouter_gemv_forwarded
forwarded.restype = ctypes.c_ulong
rng = np.random.default_rng(0)

def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)

def error(got, want):
    got = np.array(got, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

x, w, w2, cols, c = r(1, 96), r(80, 96), r(96, 80), r(96, 5), r(1, 80)
q, k = r(2, 3, 1, 64), r(2, 3, 17, 64)
x4 = r(4, 96)
errors, counts = {}, {}
start = forwarded()
errors["x @ w.T"] = error(mx.array(x) @ mx.array(w).T, x.astype(float) @ w.T)
errors["x @ w"] = error(mx.array(x) @ mx.array(w2), x.astype(float) @ w2)
errors["column.T @ w"] = error(mx.array(cols)[:, 2:3].T @ mx.array(w2),
                               cols[:, 2:3].T.astype(float) @ w2)
errors["attention q @ k.T"] = error(mx.array(q) @ mx.array(k).swapaxes(-1, -2),
                                    q.astype(float) @ k.swapaxes(-1, -2))
errors["addmm beta 2"] = error(mx.addmm(mx.array(c), mx.array(x), mx.array(w).T, alpha=0.5,
                                        beta=2.0), 2.0 * c + 0.5 * (x.astype(float) @ w.T))
counts["one row"] = forwarded() - start
start = forwarded()
errors["4 rows"] = error(mx.array(x4) @ mx.array(w).T, x4.astype(float) @ w.T)
counts["four rows"] = forwarded() - start
print(json.dumps({"errors": errors, "counts": counts}))
"""


@pytest.fixture(autouse=True)
def fresh_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv.library remembers failed directories for the process: not across tests."""
    monkeypatch.setattr(gemv, "_failed", set())


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


def test_one_row_products_go_to_sgemv_and_stay_exact(forwarder: tuple[Path, str]) -> None:
    lib, openblas = forwarder
    env = {**os.environ, "LD_PRELOAD": f"{lib}:{openblas}"}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for case, err in report["errors"].items():
        assert err < 1e-5, (case, err)
    # x @ w.T, x @ w, column.T @ w, 6 attention heads (2 x 3), addmm: at least one call each.
    assert report["counts"]["one row"] >= 10
    assert report["counts"]["four rows"] == 0


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
