// mlxrouter's vectorized MLX CPU kernels, preloaded into Linux x86-64 workers.
//
// The mlx[cpu] wheel computes exp one float at a time on x86 (its SIMD layer has one lane
// there), through libm's fmaf: about 17 ns per value. On SmolLM2-135M that made the SiLU of
// every MLP (an exp per hidden unit) a quarter of prefill and a tenth of an 8-stream decode
// step, attention's softmax most of another fifth of prefill, and the logsumexp that mlx-lm's
// batch step takes over the whole vocabulary another tenth of a decode step.
//
// This library defines mlx::core::sigmoid, softmax, logsumexp and argmax, which the mlx Python
// module and libmlx itself (attention) call through the dynamic linker, so that preloaded ours
// come first. For float32 arrays on the CPU they build the same graph MLX would, with a
// primitive of ours in place of MLX's; every other case is handed to MLX's own function. Our
// primitives run the very operations MLX's scalar code runs (argmax: its result by another
// route), in the same order (the same polynomial, the same fused
// multiply-adds, the same sequential sum), 16 (AVX-512) or 8 (AVX2) lanes at a time, so the
// results are bit-identical to MLX's; tests/integration/test_mlx_ops.py compares them.
//
// They are used only when MLX runs these functions one lane at a time (simd::max_size<float>
// is 1: a future MLX with x86 SIMD keeps its own), when the CPU has AVX2 and FMA, and unless
// MLXROUTER_FAST_OPS=0 (or "avx2" to keep off AVX-512). mlxrouter_mlx_ops() tells which
// kernels are in use and mlxrouter_mlx_ops_count() how often each ran.
//
// Built by mlxrouter (mlx_ops.py) with the system C++ compiler against the installed MLX's
// headers and libmlx.so.

#include <dlfcn.h>
#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mlx/backend/common/unary.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/simd/simd.h"
#include "mlx/backend/cpu/unary_ops.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

using namespace mlx::core;

namespace {

enum Isa { NONE = 0, AVX2 = 1, AVX512 = 2 };

Isa pick_isa() {
  if (simd::max_size<float> != 1) return NONE;  // this MLX vectorizes by itself
  const char* env = std::getenv("MLXROUTER_FAST_OPS");
  if (env && (!std::strcmp(env, "0") || !std::strcmp(env, "off"))) return NONE;
  __builtin_cpu_init();
  bool avx512 = __builtin_cpu_supports("avx512f");
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (env && !std::strcmp(env, "avx2")) avx512 = false;  // tests run both kernels
  return avx512 ? AVX512 : avx2 ? AVX2 : NONE;
}

const Isa isa = pick_isa();

// Rows or arrays computed by each kernel, for tests (mlxrouter_mlx_ops_count).
enum Op { SIGMOID = 0, SOFTMAX = 1, LOGSUMEXP = 2, ATTENTION = 3, ROPE = 4, RMS_NORM = 5,
          ARGMAX = 6 };
constexpr int OPS = 7;
std::atomic<unsigned long> counts[OPS];
std::atomic<unsigned long> rope_table_hits{0};  // RoPE calls that reused the last table

// ---- exp as MLX computes it (simd/math.h): 2^(x log2 e), the integer part by moving bits,
// the fraction by a degree-6 polynomial in fused multiply-adds; NaN kept, +inf above 88,
// 0 below -88. MLX's integer part is floor(double(t) + 0.5): floor(t) plus one when the
// fraction t - floor(t) (exact in float) is at least one half gives the same integer.

constexpr float C0 = 1.535336188319500e-4f, C1 = 1.339887440266574e-3f,
                C2 = 9.618437357674640e-3f, C3 = 5.550332471162809e-2f,
                C4 = 2.402264791363012e-1f, C5 = 6.931472028550421e-1f;

__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.442695f));
  __m512 fl = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(t, fl), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  __m512 ip = _mm512_mask_add_ps(fl, up, fl, one);
  __m512 f = _mm512_sub_ps(t, ip);
  __m512 p = _mm512_set1_ps(C0);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C5));
  p = _mm512_fmadd_ps(p, f, one);
  __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32(ip), _mm512_set1_epi32(127)), 23);
  __m512 r = _mm512_mul_ps(_mm512_castsi512_ps(e), p);
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.0f), _CMP_GT_OQ),
                         _mm512_set1_ps(std::numeric_limits<float>::infinity()));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-88.0f), _CMP_LT_OQ),
                            _mm512_setzero_ps());
}

__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.442695f));
  __m256 fl = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m256 up = _mm256_cmp_ps(_mm256_sub_ps(t, fl), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  __m256 ip = _mm256_add_ps(fl, _mm256_and_ps(up, one));
  __m256 f = _mm256_sub_ps(t, ip);
  __m256 p = _mm256_set1_ps(C0);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C5));
  p = _mm256_fmadd_ps(p, f, one);
  __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(ip), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(_mm256_castsi256_ps(e), p);
  r = _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  return _mm256_blendv_ps(r, _mm256_setzero_ps(),
                          _mm256_cmp_ps(x, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
}

// ---- sigmoid (unary_ops.h): y = 1 / (1 + exp(|x|)), then y for negative x, else 1 - y.
// The tail that does not fill a vector, and strided inputs, take MLX's scalar code itself.

__attribute__((target("avx512f"))) void sigmoid512(const float* src, float* dst, size_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 x = _mm512_loadu_ps(src + i);
    __m512 y = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_abs_ps(x))));
    __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    _mm512_storeu_ps(dst + i, _mm512_mask_mov_ps(_mm512_sub_ps(one, y), negative, y));
  }
  for (; i < n; i++) dst[i] = detail::Sigmoid{}(src[i]);
}

__attribute__((target("avx2,fma"))) void sigmoid256(const float* src, float* dst, size_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(src + i);
    __m256 y = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_and_ps(x, abs_mask))));
    __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    _mm256_storeu_ps(dst + i, _mm256_blendv_ps(_mm256_sub_ps(one, y), y, negative));
  }
  for (; i < n; i++) dst[i] = detail::Sigmoid{}(src[i]);
}

// ---- rows (logsumexp.cpp and softmax.cpp with one lane): the maximum (NaN when any value is
// NaN), exp(x - max) for every value, added up in order from 0; then log(sum) + max (max
// when it is infinite), or every exp times 1 / sum. The exps are vectorized; the sum stays
// sequential, which keeps the result bit-identical (about 4 cycles a value, against ~60 for
// MLX's exp).

// The maximum of `maximum` and x[0..n), then NaN if `nan` or any of them is.
float finish_max(const float* x, size_t n, float maximum, bool nan) {
  for (size_t i = 0; i < n; i++) {
    nan |= std::isnan(x[i]);
    maximum = x[i] > maximum ? x[i] : maximum;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : maximum;
}

// first_of's values from `i` on, one at a time.
size_t first_of_tail(const float* x, size_t i, size_t n, float m, bool nan) {
  for (; i < n; i++)
    if (nan ? std::isnan(x[i]) : x[i] == m) return i;
  return n;
}

struct Avx512 {
  __attribute__((target("avx512f"))) static float max(const float* x, size_t n) {
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __mmask16 nan = 0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      __m512 v = _mm512_loadu_ps(x + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      vmax = _mm512_max_ps(v, vmax);
    }
    return finish_max(x + i, n - i, _mm512_reduce_max_ps(vmax), nan != 0);
  }
  __attribute__((target("avx512f"))) static void exp_minus(const float* x, float* out,
                                                           size_t n, float m) {
    const __m512 vm = _mm512_set1_ps(m);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(out + i, exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm)));
    for (; i < n; i++) out[i] = simd::exp(simd::Simd<float, 1>(x[i] - m)).value;
  }
  __attribute__((target("avx512f"))) static void scale(float* x, size_t n, float factor) {
    const __m512 vf = _mm512_set1_ps(factor);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), vf));
    for (; i < n; i++) x[i] *= factor;
  }
  // out = (x * factor) * w (w may be null: x * factor), each product rounded on its own.
  __attribute__((target("avx512f"))) static void scale_by(const float* x, const float* w,
                                                          float* out, size_t n, float factor) {
    const __m512 vf = _mm512_set1_ps(factor);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vf);
      _mm512_storeu_ps(out + i, w ? _mm512_mul_ps(v, _mm512_loadu_ps(w + i)) : v);
    }
    for (; i < n; i++) out[i] = w ? (x[i] * factor) * w[i] : x[i] * factor;
  }
  // The index of the first value equal to m (-0 equals 0), or when m is NaN of the first NaN;
  // n when there is none.
  __attribute__((target("avx512f"))) static size_t first_of(const float* x, size_t n, float m) {
    const bool nan = std::isnan(m);
    const __m512 vm = _mm512_set1_ps(m);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)
                                : _mm512_cmp_ps_mask(v, vm, _CMP_EQ_OQ);
      if (hit) return i + static_cast<size_t>(__builtin_ctz(hit));
    }
    return first_of_tail(x, i, n, m, nan);
  }
};

struct Avx2 {
  __attribute__((target("avx2,fma"))) static float max(const float* x, size_t n) {
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 nan = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(x + i);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vmax = _mm256_max_ps(v, vmax);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float maximum = finish_max(lanes + 1, 7, lanes[0], false);
    return finish_max(x + i, n - i, maximum, _mm256_movemask_ps(nan) != 0);
  }
  __attribute__((target("avx2,fma"))) static void exp_minus(const float* x, float* out,
                                                            size_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)));
    for (; i < n; i++) out[i] = simd::exp(simd::Simd<float, 1>(x[i] - m)).value;
  }
  __attribute__((target("avx2,fma"))) static void scale(float* x, size_t n, float factor) {
    const __m256 vf = _mm256_set1_ps(factor);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vf));
    for (; i < n; i++) x[i] *= factor;
  }
  __attribute__((target("avx2,fma"))) static void scale_by(const float* x, const float* w,
                                                           float* out, size_t n, float factor) {
    const __m256 vf = _mm256_set1_ps(factor);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vf);
      _mm256_storeu_ps(out + i, w ? _mm256_mul_ps(v, _mm256_loadu_ps(w + i)) : v);
    }
    for (; i < n; i++) out[i] = w ? (x[i] * factor) * w[i] : x[i] * factor;
  }
  __attribute__((target("avx2,fma"))) static size_t first_of(const float* x, size_t n, float m) {
    const bool nan = std::isnan(m);
    const __m256 vm = _mm256_set1_ps(m);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      const int hit = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)
                                             : _mm256_cmp_ps(v, vm, _CMP_EQ_OQ));
      if (hit) return i + static_cast<size_t>(__builtin_ctz(hit));
    }
    return first_of_tail(x, i, n, m, nan);
  }
};

constexpr size_t BLOCK = 512;

template <typename V>
float logsumexp_row(const float* x, size_t n) {
  const float maximum = V::max(x, n);
  alignas(64) float e[BLOCK];
  float normalizer = 0.0f;
  for (size_t start = 0; start < n; start += BLOCK) {
    const size_t len = n - start < BLOCK ? n - start : BLOCK;
    V::exp_minus(x + start, e, len, maximum);
    for (size_t j = 0; j < len; j++) normalizer += e[j];
  }
  return std::isinf(maximum) ? maximum : std::log(normalizer) + maximum;
}

// `out` may be `x`.
template <typename V>
void softmax_row(const float* x, float* out, size_t n) {
  const float maximum = V::max(x, n);
  V::exp_minus(x, out, n, maximum);
  float normalizer = 0.0f;
  for (size_t i = 0; i < n; i++) normalizer += out[i];
  V::scale(out, n, 1 / normalizer);
}

// ---- a pool for the kernels' large calls: a call's items (an attention's blocks, a prefill's
// rows) are split between the calling thread (MLX's stream) and a helper per other core this
// process may run on. Helpers spin briefly for the next call (the next layer's follows within
// a millisecond), then sleep. Items are claimed from a counter tagged with the call's
// generation, so a helper the scheduler has not run yet costs nothing and a late one never
// claims an item of another call. One call at a time (MLX has one CPU stream); a second
// caller meanwhile runs its items itself. MLXROUTER_ATTENTION_THREADS sets the number of
// threads (1: the caller alone; the name is from when attention was the pool's one user).

class Pool {
 public:
  // f(i) for every i in [0, n), on the pool's threads; returns when all are done.
  void run(int n, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> caller(caller_, std::try_to_lock);
    if (threads() == 1 || n < 2 || !caller.owns_lock()) {
      for (int i = 0; i < n; i++) f(i);
      return;
    }
    shared_calls++;
    start();
    uint64_t generation;
    {
      std::lock_guard<std::mutex> hold(lock_);
      generation = generation_.load() + 1;
      job_ = &f;
      items_ = n;
      done_.store(0);
      claims_.store(tag(generation) << 32);
      generation_.store(generation, std::memory_order_release);
    }
    wake_.notify_all();
    work(generation, &f, n);
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; spins++) {
      if (spins < SPIN) {
        _mm_pause();
        continue;
      }
      std::unique_lock<std::mutex> hold(lock_);
      finished_.wait(hold, [&] { return done_.load() >= n; });
    }
  }

  static int threads() {
    static const int n = [] {
      const char* env = std::getenv("MLXROUTER_ATTENTION_THREADS");
      if (env && *env) return std::max(1, std::atoi(env));
      cpu_set_t set;
      return sched_getaffinity(0, sizeof set, &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
    }();
    return std::min(n, 64);
  }

  std::atomic<unsigned long> shared_calls{0};  // calls split between threads (for tests)

 private:
  static constexpr int SPIN = 2000;

  void start() {
    if (started_ == getpid()) return;  // a forked child starts its own
    started_ = getpid();
    for (int i = 1; i < threads(); i++) std::thread([this] { helper(); }).detach();
  }

  // A call's tag in the claims counter's upper 32 bits (it wraps after 2^32 calls; the
  // generation itself does not).
  static uint64_t tag(uint64_t generation) { return generation & 0xffffffffu; }

  // Items of call `generation` until none is left.
  void work(uint64_t generation, const std::function<void(int)>* f, int n) {
    for (;;) {
      uint64_t claim = claims_.load();
      do {
        if (claim >> 32 != tag(generation) || static_cast<int>(claim & 0xffffffff) >= n) return;
      } while (!claims_.compare_exchange_weak(claim, claim + 1));
      (*f)(static_cast<int>(claim & 0xffffffff));
      if (done_.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> hold(lock_);
        finished_.notify_all();
      }
    }
  }

  void helper() {
    uint64_t seen = 0;
    for (;;) {
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen && spins < SPIN;
           spins++) {
        _mm_pause();
      }
      std::unique_lock<std::mutex> hold(lock_);
      wake_.wait(hold, [&] { return generation_.load() != seen; });
      seen = generation_.load();
      const std::function<void(int)>* f = job_;
      const int n = items_;
      hold.unlock();
      work(seen, f, n);
    }
  }

  std::mutex caller_, lock_;
  std::condition_variable wake_, finished_;
  const std::function<void(int)>* job_ = nullptr;
  int items_ = 0;
  std::atomic<int> done_{0};
  std::atomic<uint64_t> claims_{0}, generation_{0};
  pid_t started_ = 0;
};

// Never destroyed: at exit its helpers still wait on its condition variable.
Pool& pool = *new Pool;

// f(i) for every i in [0, n): on the pool when `values` (about how many floats the call
// reads or writes) make it worth waking a helper, a few microseconds, else here. A prefill's
// softmax, normalizations, SiLU and RoPE (hundreds of thousands of values each) otherwise
// ran on MLX's one stream thread while OpenBLAS's threads, idle between products, yielded
// the other core: an eighth of a prefill of 8 x 131 tokens on 2 cores (SmolLM2). Decode's
// are smaller, except the logsumexp over the vocabulary of every stream.
constexpr int64_t SHARED_MIN_VALUES = 1 << 16;
template <typename F>
void share(int n, int64_t values, F f) {
  if (values < SHARED_MIN_VALUES || n < 2) {
    for (int i = 0; i < n; i++) f(i);
    return;
  }
  pool.run(n, f);
}

// Rows [first, last) of `a` (all but its last axis, in row-major order): f(r, offset of r).
template <typename F>
void rows_of(const array& a, size_t first, size_t last, F& f) {
  const int axes = a.ndim() > 1 ? static_cast<int>(a.ndim()) - 1 : 0;
  std::vector<int> index(axes, 0);
  int64_t offset = 0;
  size_t rest = first;
  for (int d = axes - 1; d >= 0; d--) {  // row `first`'s index and offset
    index[d] = static_cast<int>(rest % a.shape(d));
    rest /= a.shape(d);
    offset += index[d] * a.strides()[d];
  }
  for (size_t r = first; r < last; r++) {
    f(r, offset);
    for (int d = axes - 1; d >= 0; d--) {  // the next row, odometer-style
      offset += a.strides()[d];
      if (++index[d] < a.shape(d)) break;
      offset -= a.strides()[d] * a.shape(d);
      index[d] = 0;
    }
  }
}

// f(r, offset of row r) for every row of `a`, shared by the pool's threads when `a` is large
// (each row by one thread, in the same order as alone: the results do not change). f may be
// called from several threads at once, for different rows.
template <typename F>
void for_each_row(const array& a, F f) {
  const size_t rows = a.ndim() ? a.size() / a.shape(-1) : 1;
  const int parts = static_cast<int>(std::min<size_t>(rows, 4 * Pool::threads()));
  share(parts, static_cast<int64_t>(a.size()), [&](int i) {
    rows_of(a, rows * i / parts, rows * (i + 1) / parts, f);
  });
}

// The n values of a row at x, `stride` apart: x itself when they are contiguous, else a copy
// in this thread's buffer (rows are shared between threads), valid until its next call.
const float* contiguous_row(const float* x, size_t n, int64_t stride) {
  if (stride == 1) return x;
  thread_local std::vector<float> row;
  row.resize(n);
  for (size_t j = 0; j < n; j++) row[j] = x[j * stride];
  return row.data();
}

// f(first, offsets, count) for groups of up to ROW_GROUP consecutive rows of `a` (rows
// first .. first + count - 1, at those offsets), shared as for_each_row shares rows: a kernel
// whose rows each need a sum added in order can keep a group's sums side by side, one
// addition chain per row, where one row at a time waited on each addition's latency.
constexpr int ROW_GROUP = 8;
template <typename F>
void for_each_rows(const array& a, F f) {
  const size_t rows = a.ndim() ? a.size() / a.shape(-1) : 1;
  const bool shared = static_cast<int64_t>(a.size()) >= SHARED_MIN_VALUES;
  // Every thread gets rows (a batch's 8 long rows: 4 each), in whole groups where there are
  // enough of them.
  const size_t threads = Pool::threads(), groups = (rows + ROW_GROUP - 1) / ROW_GROUP;
  const int parts = shared ? static_cast<int>(std::min<size_t>(
                                 4 * threads, std::max(std::min(rows, threads), groups)))
                           : 1;
  share(parts, static_cast<int64_t>(a.size()), [&](int i) {
    int64_t offsets[ROW_GROUP];
    int count = 0;
    size_t first = 0;
    auto add = [&](size_t r, int64_t offset) {
      if (count == 0) first = r;
      offsets[count++] = offset;
      if (count == ROW_GROUP) {
        f(first, offsets, count);
        count = 0;
      }
    };
    rows_of(a, rows * i / parts, rows * (i + 1) / parts, add);
    if (count) f(first, offsets, count);
  });
}

// sums[k] = the squares of row k's n values (stride `stride` from src + offsets[k]) added one
// after the other from 0, each square rounded on its own: MLX's one-lane sum of x * x.
void squares_in_order(const float* src, const int64_t* offsets, int count, size_t n,
                      int64_t stride, float* sums) {
  if (count == 1) {
    const float* in = src + offsets[0];
    float sum = 0.0f;
    for (size_t i = 0; i < n; i++) {
      const float square = in[i * stride] * in[i * stride];
      sum = sum + square;
    }
    sums[0] = sum;
    return;
  }
  const float* in[ROW_GROUP];
  float s[ROW_GROUP];
  for (int k = 0; k < ROW_GROUP; k++) {  // a short group repeats its first row, unused
    in[k] = src + offsets[k < count ? k : 0];
    s[k] = 0.0f;
  }
  for (size_t i = 0; i < n; i++) {
    const int64_t at = static_cast<int64_t>(i) * stride;
#pragma GCC unroll 8
    for (int k = 0; k < ROW_GROUP; k++) {  // 8 independent chains
      const float square = in[k][at] * in[k][at];
      s[k] = s[k] + square;
    }
  }
  for (int k = 0; k < count; k++) sums[k] = s[k];
}

// logsumexp_row of `count` (at most ROW_GROUP) rows of n values at once: each row's maximum
// and exps as alone, and their sums side by side, each row's added in order from its first
// value, so each result is logsumexp_row's.
template <typename V>
void logsumexp_rows(const float* const* x, size_t n, int count, float* result) {
  if (count == 1) {
    result[0] = logsumexp_row<V>(x[0], n);
    return;
  }
  float maxima[ROW_GROUP], sums[ROW_GROUP] = {};
  alignas(64) float e[ROW_GROUP][BLOCK];
  for (int k = 0; k < count; k++) maxima[k] = V::max(x[k], n);
  for (int k = count; k < ROW_GROUP; k++) std::fill(e[k], e[k] + BLOCK, 0.0f);  // unused
  for (size_t start = 0; start < n; start += BLOCK) {
    const size_t len = n - start < BLOCK ? n - start : BLOCK;
    for (int k = 0; k < count; k++) V::exp_minus(x[k] + start, e[k], len, maxima[k]);
    for (size_t j = 0; j < len; j++) {
#pragma GCC unroll 8
      for (int k = 0; k < ROW_GROUP; k++) sums[k] = sums[k] + e[k][j];
    }
  }
  for (int k = 0; k < count; k++)
    result[k] = std::isinf(maxima[k]) ? maxima[k] : std::log(sums[k]) + maxima[k];
}

// ---- argmax (arg_reduce.cpp): MLX's loop keeps the first value greater than every one before
// it (from -inf, at index 0), and the first NaN once it meets one. That is the first NaN of a
// row when it has one, else the first of its largest values (-0 and 0 alike), which the
// vectors find in two passes: the maximum (NaN when any value is), then the first value equal
// to it. MLX's loop took 40 us per row of SmolLM2's 49,152 logits here, a batch step's 8 rows
// a third of a millisecond.
template <typename V>
uint32_t argmax_row(const float* x, size_t n) {
  return static_cast<uint32_t>(V::first_of(x, n, V::max(x, n)));
}

// ---- the primitives

class FastSigmoid : public UnaryPrimitive {
 public:
  explicit FastSigmoid(Stream stream) : UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& in = inputs[0];
    set_unary_output_data(in, out);
    auto& encoder = cpu::get_command_encoder(stream());
    encoder.set_input_array(in);
    encoder.set_output_array(out);
    encoder.dispatch([in = array::unsafe_weak_copy(in),
                      out = array::unsafe_weak_copy(out)]() mutable {
      counts[SIGMOID]++;
      if (!in.flags().contiguous) {  // out is row-contiguous
        const size_t n = in.ndim() ? in.shape(-1) : 1;
        const int64_t stride = in.ndim() ? in.strides().back() : 1;
        const float* src = in.data<float>();
        float* dst = out.data<float>();
        for_each_row(in, [&](size_t r, int64_t offset) {
          for (size_t j = 0; j < n; j++) {
            dst[r * n + j] = detail::Sigmoid{}(src[offset + j * stride]);
          }
        });
      } else {
        // Contiguous: pieces of whole vectors, so that every value takes the same path
        // (vector or scalar tail) as it would alone.
        const size_t n = in.data_size();
        const int parts = static_cast<int>(std::min<size_t>(n / 64 + 1, 4 * Pool::threads()));
        const size_t piece = (n / parts + 15) / 16 * 16;
        const float* src = in.data<float>();
        float* dst = out.data<float>();
        share(parts, static_cast<int64_t>(n), [&](int i) {
          const size_t first = std::min(n, i * piece);
          const size_t count = i + 1 == parts ? n - first : std::min(n - first, piece);
          if (isa == AVX512) {
            sigmoid512(src + first, dst + first, count);
          } else {
            sigmoid256(src + first, dst + first, count);
          }
        });
      }
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[mlxrouter sigmoid] CPU only");
  }
  std::vector<array> vjp(const std::vector<array>&, const std::vector<array>& cotangents,
                         const std::vector<int>&, const std::vector<array>& outputs) override {
    const array& s = outputs[0];
    auto ds = multiply(s, subtract(array(1.0f, s.dtype()), s, stream()), stream());
    return {multiply(cotangents[0], ds, stream())};
  }
  std::vector<array> jvp(const std::vector<array>& primals, const std::vector<array>& tangents,
                         const std::vector<int>&) override {
    auto s = sigmoid(primals[0], stream());
    auto ds = multiply(s, subtract(array(1.0f, s.dtype()), s, stream()), stream());
    return {multiply(tangents[0], ds, stream())};
  }
  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    return {{sigmoid(inputs[0], stream())}, axes};
  }
  const char* name() const override { return "Sigmoid"; }
  bool is_equivalent(const Primitive&) const override { return true; }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }
};

// What logsumexp and argmax over the last axis (keeping it, as 1) share: their output's
// shape, and vmap, which moves a mapped last axis out of the way of the reduction.
class LastAxisReduction : public UnaryPrimitive {
 public:
  using UnaryPrimitive::UnaryPrimitive;
  bool is_equivalent(const Primitive&) const override { return true; }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    auto s = inputs[0].shape();
    s.back() = 1;
    return {s};
  }

 protected:
  template <typename Reduce>
  std::pair<std::vector<array>, std::vector<int>> vmap_last_axis(const std::vector<array>& inputs,
                                                                 const std::vector<int>& axes,
                                                                 Reduce reduce) {
    auto x = inputs[0];
    int ax = axes[0];
    if (ax == static_cast<int>(x.ndim()) - 1) {  // keep the reduced axis last
      x = moveaxis(x, ax, 0, stream());
      ax = 0;
    }
    return {{reduce(x)}, {ax}};
  }
};

class FastLogSumExp : public LastAxisReduction {
 public:
  explicit FastLogSumExp(Stream stream) : LastAxisReduction(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& in = inputs[0];
    out.set_data(allocator::malloc(out.nbytes()));
    auto& encoder = cpu::get_command_encoder(stream());
    encoder.set_input_array(in);
    encoder.set_output_array(out);
    encoder.dispatch([in = array::unsafe_weak_copy(in),
                      out = array::unsafe_weak_copy(out)]() mutable {
      counts[LOGSUMEXP]++;
      const size_t n = in.shape(-1);
      const int64_t stride = in.strides().back();
      const float* src = in.data<float>();
      float* dst = out.data<float>();
      if (stride == 1) {  // a batch's rows of logits: their sums side by side
        for_each_rows(in, [&](size_t first, const int64_t* offsets, int count) {
          const float* rows[ROW_GROUP];
          for (int k = 0; k < count; k++) rows[k] = src + offsets[k];
          isa == AVX512 ? logsumexp_rows<Avx512>(rows, n, count, dst + first)
                        : logsumexp_rows<Avx2>(rows, n, count, dst + first);
        });
        return;
      }
      for_each_row(in, [&](size_t r, int64_t offset) {
        const float* x = contiguous_row(src + offset, n, stride);
        dst[r] = isa == AVX512 ? logsumexp_row<Avx512>(x, n) : logsumexp_row<Avx2>(x, n);
      });
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[mlxrouter logsumexp] CPU only");
  }
  std::vector<array> vjp(const std::vector<array>& primals,
                         const std::vector<array>& cotangents, const std::vector<int>&,
                         const std::vector<array>& outputs) override {
    auto p = softmax(primals[0], std::vector<int>{-1}, true, stream());  // d logsumexp / dx
    return {multiply(cotangents[0], p, stream())};
  }
  std::vector<array> jvp(const std::vector<array>& primals, const std::vector<array>& tangents,
                         const std::vector<int>&) override {
    auto p = softmax(primals[0], std::vector<int>{-1}, true, stream());
    return {sum(multiply(tangents[0], p, stream()), std::vector<int>{-1}, true, stream())};
  }
  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    return vmap_last_axis(inputs, axes, [this](const array& x) {
      return logsumexp(x, std::vector<int>{-1}, true, stream());
    });
  }
  const char* name() const override { return "LogSumExp"; }
};

class FastArgMax : public LastAxisReduction {
 public:
  explicit FastArgMax(Stream stream) : LastAxisReduction(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& in = inputs[0];
    out.set_data(allocator::malloc(out.nbytes()));
    auto& encoder = cpu::get_command_encoder(stream());
    encoder.set_input_array(in);
    encoder.set_output_array(out);
    encoder.dispatch([in = array::unsafe_weak_copy(in),
                      out = array::unsafe_weak_copy(out)]() mutable {
      counts[ARGMAX]++;
      const size_t n = in.shape(-1);
      const int64_t stride = in.strides().back();
      const float* src = in.data<float>();
      uint32_t* dst = out.data<uint32_t>();
      for_each_row(in, [&](size_t r, int64_t offset) {
        const float* x = contiguous_row(src + offset, n, stride);
        dst[r] = isa == AVX512 ? argmax_row<Avx512>(x, n) : argmax_row<Avx2>(x, n);
      });
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[mlxrouter argmax] CPU only");
  }
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>&,
                         const std::vector<int>&, const std::vector<array>&) override {
    return {zeros_like(primals[0], stream())};  // indices have no gradient
  }
  std::vector<array> jvp(const std::vector<array>& primals, const std::vector<array>&,
                         const std::vector<int>&) override {
    return {zeros(output_shapes(primals)[0], uint32, stream())};
  }
  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    return vmap_last_axis(inputs, axes,
                          [this](const array& x) { return argmax(x, -1, true, stream()); });
  }
  const char* name() const override { return "ArgMax"; }
};

class FastSoftmax : public UnaryPrimitive {
 public:
  FastSoftmax(Stream stream, bool precise) : UnaryPrimitive(stream), precise_(precise) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& in = inputs[0];
    const bool in_place = in.flags().row_contiguous && in.is_donatable();
    if (in_place) {
      out.copy_shared_buffer(in);
    } else {
      out.set_data(allocator::malloc(out.nbytes()));  // row-contiguous
    }
    auto& encoder = cpu::get_command_encoder(stream());
    encoder.set_input_array(in);
    encoder.set_output_array(out);
    encoder.dispatch([in = array::unsafe_weak_copy(in),
                      out = array::unsafe_weak_copy(out)]() mutable {
      counts[SOFTMAX]++;
      const size_t n = in.shape(-1);
      const int64_t stride = in.strides().back();
      const float* src = in.data<float>();
      float* dst = out.data<float>();
      for_each_row(in, [&](size_t r, int64_t offset) {
        float* y = dst + r * n;
        const float* x = src + offset;
        if (stride != 1) {
          for (size_t j = 0; j < n; j++) y[j] = x[j * stride];
          x = y;
        }
        if (isa == AVX512) {
          softmax_row<Avx512>(x, y, n);
        } else {
          softmax_row<Avx2>(x, y, n);
        }
      });
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[mlxrouter softmax] CPU only");
  }
  std::vector<array> vjp(const std::vector<array>&, const std::vector<array>& cotangents,
                         const std::vector<int>&, const std::vector<array>& outputs) override {
    const array& s = outputs[0];  // d softmax: s c - s sum(s c)
    auto sc = multiply(s, cotangents[0], stream());
    auto total = sum(sc, std::vector<int>{-1}, true, stream());
    return {subtract(sc, multiply(s, total, stream()), stream())};
  }
  std::vector<array> jvp(const std::vector<array>& primals, const std::vector<array>& tangents,
                         const std::vector<int>&) override {
    auto s = softmax(primals[0], std::vector<int>{-1}, precise_, stream());
    auto sv = multiply(s, tangents[0], stream());  // s t - s sum(s t)
    auto total = sum(sv, std::vector<int>{-1}, true, stream());
    return {subtract(sv, multiply(s, total, stream()), stream())};
  }
  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    // As MLX's: when the mapped axis is the last one, the softmax is over the one before it.
    const int ax = axes[0];
    const int axis = ax >= 0 && ax < static_cast<int>(inputs[0].ndim()) - 1 ? -1 : -2;
    return {{softmax(inputs[0], std::vector<int>{axis}, precise_, stream())}, axes};
  }
  const char* name() const override { return "Softmax"; }
  bool is_equivalent(const Primitive& other) const override {
    return precise_ == static_cast<const FastSoftmax&>(other).precise_;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  // What was asked for (float32 computes alike either way), where MLX's Softmax keeps it:
  // mx.export_function takes a primitive by its name and reads this member.
  bool precise_;
};

// ---- attention: softmax(q K^T scale + mask) V per head, for decode's one query position and
// for a prefill's many. MLX's CPU has no fused attention: its fallback builds about a dozen
// ops per layer (scale, broadcast of K and V to every query head of a group, two batched
// matrix products, the mask, the softmax), which at 8 sequences of a few hundred tokens took
// a quarter of a SmolLM2 decode step. In a prefill it also materializes every score (a
// 2,000-token prompt: 144 MB per layer, freshly faulted in), computes the masked half of a
// causal attention, and multiplies with one OpenBLAS call per head; it took 20% of a prefill
// of 8 x 131 tokens and 65% of one of 2,000 (SmolLM2, 2 cores). Here one pass per (sequence,
// key-value head, block of query positions) reads K and V once for all the query heads and
// positions that share them, and stops at the last key a position may see (causal, or the
// last one a boolean mask keeps). The softmax is the one above (vectorized exps, the sum in
// order from the first key); masked keys are skipped, so a sequence's result does not
// depend on the left padding or the other sequences of a batch. Not bit-identical to MLX's
// fallback (the dot products are summed in another order): tests/integration/test_mlx_ops.py
// bounds the difference.

struct Strided4 {  // element offsets of a 4-d array, broadcast dimensions stride 0
  int64_t s[4];
  explicit Strided4(const array& a) {
    const int pad = 4 - static_cast<int>(a.ndim());
    for (int d = 0; d < 4; d++) {
      s[d] = d < pad || a.shape(d - pad) == 1 ? 0 : a.strides()[d - pad];
    }
  }
  int64_t at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return i0 * s[0] + i1 * s[1] + i2 * s[2] + i3 * s[3];
  }
};

// What the mask of an attention is. CAUSAL: none, but query position i of Tq sees the keys
// up to i + Tk - Tq (MLX's "causal" mode).
enum MaskKind { NO_MASK = 0, BOOL_MASK = 1, ADDITIVE_MASK = 2, CAUSAL = 3 };

#define NAME(x) x##_avx512
#define LANES 16
#define TARGET __attribute__((target("avx512f,avx512dq")))
#define ROWS Avx512
#include "decode_attention.h"
#define NAME(x) x##_avx2
#define LANES 8
#define TARGET __attribute__((target("avx2,fma")))
#define ROWS Avx2
#include "decode_attention.h"


// Every (sequence, key-value head, block of query positions) of an attention. A block's
// query heads and positions go through attend() together as its rows, so each key and value
// row is read once for all of them; each row's output is what it would be alone (keys it may
// not see weigh exactly 0, adding nothing), so a prefill gives the same values however it is
// cut, with or without a cache before it.
void attention(const array& q, const array& k, const array& v, const array* mask,
               MaskKind kind, float scale, array& out) {
  const int B = q.shape(0), Hq = q.shape(1), Tq = q.shape(2), Hkv = k.shape(1),
            Tk = k.shape(2);
  const int dk = q.shape(3), dv = v.shape(3), group = Hq / Hkv;
  const int per_block = std::max(1, std::min(Tq, 32 / group));  // positions per item
  const int blocks = (Tq + per_block - 1) / per_block;
  const Strided4 qs(q), ks(k), vs(v);
  const Strided4 ms = mask ? Strided4(*mask) : Strided4(q);
  const float* qd = q.data<float>();
  const float* kd = k.data<float>();
  const float* vd = v.data<float>();
  const char* md = mask ? mask->data<char>() : nullptr;
  const size_t item = mask ? mask->itemsize() : 0;
  float* od = out.data<float>();
  // Causal rows' masks: row r sees T_r keys through keep + Tk - T_r (Tk trues, then falses).
  std::vector<char> keep(kind == CAUSAL ? 2 * static_cast<size_t>(Tk) : 0, 0);
  std::fill(keep.begin(), keep.begin() + keep.size() / 2, 1);
  auto one = [&](int i) {
    const int t0 = i % blocks * per_block, b = i / blocks / Hkv, g = i / blocks % Hkv;
    const int positions = std::min(per_block, Tq - t0), n = positions * group;
    thread_local std::vector<float> rows, scores, kcopy, vcopy, result;
    thread_local std::vector<const void*> masks;
    rows.resize(static_cast<size_t>(n) * dk);
    scores.resize(static_cast<size_t>(n) * Tk);
    result.resize(static_cast<size_t>(n) * dv);
    masks.resize(n);
    // Row r: query head g * group + r % group at position t0 + r / group. The keys it sees:
    // the ones past them would weigh exactly 0 (exp of -inf). A row whose every key is
    // masked keeps them all, weighed equally as MLX does.
    int T = kind == CAUSAL ? t0 + positions - 1 + Tk - Tq + 1 : Tk;
    int last = -1;
    for (int r = 0; r < n; r++) {
      const int h = g * group + r % group, t = t0 + r / group;
      const int64_t base = qs.at(b, h, t, 0);
      for (int d = 0; d < dk; d++) rows[r * dk + d] = scale * qd[base + d * qs.s[3]];
      if (kind == CAUSAL) {
        masks[r] = keep.data() + (Tk - (t + Tk - Tq + 1));
      } else if (mask) {
        masks[r] = md + ms.at(b, h, t, 0) * item;
        if (kind == BOOL_MASK && last < Tk - 1) {
          const bool* m = static_cast<const bool*>(masks[r]);
          int j = Tk - 1;
          while (j >= 0 && !m[j * ms.s[3]]) j--;
          last = j < 0 ? Tk - 1 : std::max(last, j);
        }
      }
    }
    if (kind == BOOL_MASK) T = last + 1;
    // Keys or values whose rows are not contiguous are copied first (the slices and
    // transposes of mlx-lm's caches keep them contiguous).
    const float* kb = kd + ks.at(b, g, 0, 0);
    const float* vb = vd + vs.at(b, g, 0, 0);
    int64_t k_step = ks.s[2], v_step = vs.s[2];
    if (ks.s[3] != 1) {
      kcopy.resize(static_cast<size_t>(T) * dk);
      for (int j = 0; j < T; j++)
        for (int d = 0; d < dk; d++) kcopy[j * dk + d] = kb[j * k_step + d * ks.s[3]];
      kb = kcopy.data(), k_step = dk;
    }
    if (vs.s[3] != 1) {
      vcopy.resize(static_cast<size_t>(T) * dv);
      for (int j = 0; j < T; j++)
        for (int d = 0; d < dv; d++) vcopy[j * dv + d] = vb[j * v_step + d * vs.s[3]];
      vb = vcopy.data(), v_step = dv;
    }
    const MaskKind rows_kind = kind == CAUSAL ? BOOL_MASK : kind;
    const int64_t mask_step = kind == CAUSAL ? 1 : ms.s[3];
    if (isa == AVX512) {
      attend_avx512(n, T, dk, dv, rows.data(), kb, k_step, vb, v_step, rows_kind, masks.data(),
                    mask_step, scores.data(), result.data());
    } else {
      attend_avx2(n, T, dk, dv, rows.data(), kb, k_step, vb, v_step, rows_kind, masks.data(),
                  mask_step, scores.data(), result.data());
    }
    for (int r = 0; r < n; r++) {
      const int h = g * group + r % group, t = t0 + r / group;
      std::memcpy(od + ((static_cast<int64_t>(b) * Hq + h) * Tq + t) * dv,
                  result.data() + static_cast<size_t>(r) * dv, dv * sizeof(float));
    }
  };
  // Spread over the pool when there is enough to share (8 sequences of SmolLM2 from 64 keys
  // on, one from about 500): waking a helper costs a few microseconds.
  const int64_t work = static_cast<int64_t>(B) * Hq * Tq * Tk * (dk + dv);
  const int items = B * Hkv * blocks;
  if (work >= (1 << 19)) {
    pool.run(items, one);
  } else {
    for (int i = 0; i < items; i++) one(i);
  }
}

// The stream's encoder, told of a primitive's inputs and output.
cpu::CommandEncoder& encode(Stream stream, const std::vector<array>& inputs, array& out) {
  auto& encoder = cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  return encoder;
}

// Copies of arrays for a dispatched task, which must not hold references to them.
std::vector<array> weak_copies(const std::vector<array>& arrays) {
  std::vector<array> held;
  for (const auto& a : arrays) held.push_back(array::unsafe_weak_copy(a));
  return held;
}

class FastAttention : public UnaryPrimitive {
 public:
  FastAttention(Stream stream, float scale, MaskKind kind)
      : UnaryPrimitive(stream), scale_(scale), kind_(kind) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    out.set_data(allocator::malloc(out.nbytes()));
    auto& encoder = encode(stream(), inputs, out);
    encoder.dispatch([held = weak_copies(inputs), out = array::unsafe_weak_copy(out),
                      scale = scale_, kind = kind_]() mutable {
      counts[ATTENTION]++;
      const array &q = held[0], &k = held[1], &v = held[2];
      const array* mask = held.size() > 3 ? &held[3] : nullptr;
      attention(q, k, v, mask, kind, scale, out);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[mlxrouter attention] CPU only");
  }
  const char* name() const override { return "Attention"; }
  bool is_equivalent(const Primitive& other) const override {
    const auto& o = static_cast<const FastAttention&>(other);
    return scale_ == o.scale_ && kind_ == o.kind_;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1), inputs[0].shape(2), inputs[2].shape(3)}};
  }

 private:
  float scale_;
  MaskKind kind_;
};

// ---- rotary position embedding (fast::rope), forward, float32. MLX's CPU composes it from
// about 15 ops per call (positions, frequencies, cos, sin, products, slices, a concatenate),
// twice per layer: with 8 sequences a tenth of a SmolLM2 decode step. Here one pass computes
// the same values in the same order with the same functions (MLX's exp, std::cos, std::sin,
// each product and sum rounded on its own), so the result is bit-identical to MLX's.

// The cos and sin tables of a RoPE call: (offset row, position, frequency). Every layer's
// queries and keys of one step rotate by the same positions, so a model's 2 x layers calls
// ask for the same table: the last one is kept (per thread, up to ROPE_TABLE_MAX values) and
// reused when the offsets, positions, scale and frequencies are the same bits: the same
// values. Building one costs a std::cos and a std::sin per value: about 22 ms of a 700-1,000
// ms prefill of 8 x 128 tokens on SmolLM2 (2026-12-06, benchmarks/row_ops.py) when built 60
// times.
struct RopeTable {
  std::vector<int32_t> offsets;
  int T = -1;
  float scale = 0.0f;
  std::vector<float> inv, cs, sn;
};
constexpr size_t ROPE_TABLE_MAX = size_t(1) << 20;

const RopeTable& rope_table(const std::vector<int32_t>& offsets, int T, int half, float scale,
                            const std::vector<float>& inv) {
  thread_local RopeTable kept;
  thread_local RopeTable fresh;
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  if (kept.T == T && kept.offsets == offsets && same_bits(kept.inv, inv) &&
      std::memcmp(&kept.scale, &scale, sizeof scale) == 0) {
    rope_table_hits++;
    return kept;
  }
  const size_t rows = offsets.size();
  RopeTable& t = rows * T * half <= ROPE_TABLE_MAX ? kept : fresh;
  t.offsets = offsets;
  t.T = T;
  t.scale = scale;
  t.inv = inv;
  t.cs.resize(rows * T * half);
  t.sn.resize(t.cs.size());
  // (A prefill's: a few microseconds per position, shared between threads by position.)
  share(static_cast<int>(rows) * T, static_cast<int64_t>(t.cs.size()) * 16, [&](int bt) {
    const int b = bt / T, tt = bt % T;
    const float position = (static_cast<float>(tt) + static_cast<float>(offsets[b])) * scale;
    for (int j = 0; j < half; j++) {
      const float theta = position * inv[j];
      const size_t at = (static_cast<size_t>(b) * T + tt) * half + j;
      t.cs[at] = detail::Cos{}(theta);
      t.sn[at] = detail::Sin{}(theta);
    }
  });
  if (&t == &fresh) kept.T = -1;  // too large to keep: the next call builds its own
  return t;
}

class FastRope : public UnaryPrimitive {
 public:
  FastRope(Stream stream, int dims, bool traditional, float base, float scale, bool freqs)
      : UnaryPrimitive(stream),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale),
        freqs_(freqs) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    out.set_data(allocator::malloc(out.nbytes()));
    auto& encoder = encode(stream(), inputs, out);
    encoder.dispatch([held = weak_copies(inputs), out = array::unsafe_weak_copy(out), dims = dims_,
                      traditional = traditional_, base = base_, scale = scale_,
                      freqs = freqs_]() mutable {
      counts[ROPE]++;
      const array &x = held[0], &offset = held[1];
      const int B = x.shape(0), N = x.shape(1), T = x.shape(2), D = x.shape(3);
      const int half = dims / 2;
      // The inverse frequencies: 1 / freqs, or exp(-j log(base) / half) as MLX builds them.
      std::vector<float> inv(half);
      if (freqs) {
        const array& f = held[2];
        for (int j = 0; j < half; j++) inv[j] = 1.0f / f.data<float>()[j * f.strides()[0]];
      } else {
        const float step = std::log(base) / half;
        for (int j = 0; j < half; j++) inv[j] = detail::Exp{}(static_cast<float>(-j) * step);
      }
      // cos and sin of every (offset row, position, frequency).
      const int rows = offset.size() > 1 ? B : 1;
      std::vector<int32_t> offsets(rows);
      for (int b = 0; b < rows; b++)
        offsets[b] = offset.data<int32_t>()[offset.ndim() ? b * offset.strides()[0] : 0];
      const RopeTable& table = rope_table(offsets, T, half, scale, inv);
      const std::vector<float>& cs = table.cs;
      const std::vector<float>& sn = table.sn;
      const float* src = x.data<float>();
      float* dst = out.data<float>();
      const auto& st = x.strides();
      const int64_t sd = st[3];
      // Every (sequence, head) on its own, shared between threads when large.
      share(B * N, static_cast<int64_t>(x.size()), [&](int bn) {
        const int b = bn / N, n = bn % N;
        for (int t = 0; t < T; t++) {
          const float* in = src + b * st[0] + n * st[1] + t * st[2];
          float* o = dst + ((static_cast<int64_t>(b) * N + n) * T + t) * D;
          const size_t at = (static_cast<size_t>(rows > 1 ? b : 0) * T + t) * half;
          const float* c = cs.data() + at;
          const float* s = sn.data() + at;
          for (int j = 0; j < half; j++) {
            const int i1 = traditional ? 2 * j : j, i2 = traditional ? 2 * j + 1 : half + j;
            const float x1 = in[i1 * sd], x2 = in[i2 * sd];
            o[i1] = x1 * c[j] - x2 * s[j];
            o[i2] = x1 * s[j] + x2 * c[j];
          }
          for (int d = dims; d < D; d++) o[d] = in[d * sd];
        }
      });
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[mlxrouter rope] CPU only");
  }
  const char* name() const override { return "RoPE"; }
  bool is_equivalent(const Primitive& other) const override {
    const auto& o = static_cast<const FastRope&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ &&
           scale_ == o.scale_ && freqs_ == o.freqs_;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  int dims_;
  bool traditional_;
  float base_;
  float scale_;
  bool freqs_;
};

// ---- RMS normalization (fast::rms_norm), float32. MLX's CPU composes it from 6 ops per call
// (square, sum, times 1/n, plus eps, rsqrt, times x, times the weight), each one more array,
// more graph to build and more work for the scheduler: twice per layer and once at the end,
// 61 calls per SmolLM2 step. Here one pass per row computes the same values in the same
// order: the squares added one after the other from 0 (MLX's one-lane sum), times the float
// 1/n, plus eps, 1 / sqrt, then x times that, times the weight, each rounded on its own.

class FastRmsNorm : public UnaryPrimitive {
 public:
  FastRmsNorm(Stream stream, float eps, bool weighted)
      : UnaryPrimitive(stream), eps_(eps), weighted_(weighted) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    out.set_data(allocator::malloc(out.nbytes()));
    auto& encoder = encode(stream(), inputs, out);
    encoder.dispatch([held = weak_copies(inputs), out = array::unsafe_weak_copy(out), eps = eps_,
                      weighted = weighted_]() mutable {
      counts[RMS_NORM]++;
      const array& x = held[0];
      const size_t n = x.shape(-1);
      const int64_t sx = x.strides().back();
      const float inverse_n = static_cast<float>(1.0 / static_cast<double>(n));
      const float* w = weighted ? held[1].data<float>() : nullptr;
      const int64_t sw = weighted ? held[1].strides()[0] : 0;
      const float* src = x.data<float>();
      float* dst = out.data<float>();
      for_each_rows(x, [&](size_t first, const int64_t* offsets, int count) {
        float sums[ROW_GROUP];
        squares_in_order(src, offsets, count, n, sx, sums);
        for (int k = 0; k < count; k++) {
          const float* in = src + offsets[k];
          const float scale = 1.0f / std::sqrt(sums[k] * inverse_n + eps);
          float* o = dst + (first + k) * n;
          if (sx == 1 && (!w || sw == 1)) {
            isa == AVX512 ? Avx512::scale_by(in, w, o, n, scale)
                          : Avx2::scale_by(in, w, o, n, scale);
          } else if (w) {
            for (size_t i = 0; i < n; i++) o[i] = (in[i * sx] * scale) * w[i * sw];
          } else {
            for (size_t i = 0; i < n; i++) o[i] = in[i * sx] * scale;
          }
        }
      });
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[mlxrouter rms_norm] CPU only");
  }
  const char* name() const override { return "RMSNorm"; }
  bool is_equivalent(const Primitive& other) const override {
    const auto& o = static_cast<const FastRmsNorm&>(other);
    return eps_ == o.eps_ && weighted_ == o.weighted_;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float eps_;
  bool weighted_;
};

// MLX's own definitions, found under our own symbols' names after us in the search order.
template <typename F>
F next_definition(F ours) {
  Dl_info info;
  void* next = nullptr;
  if (dladdr(reinterpret_cast<void*>(ours), &info) && info.dli_sname) {
    next = dlsym(RTLD_NEXT, info.dli_sname);
  }
  if (!next) throw std::runtime_error("[mlxrouter mlx_ops] MLX's own function is missing");
  return reinterpret_cast<F>(next);
}

// MLXROUTER_FAST_OPS_EXCEPT: kernels left to MLX by name (sigmoid, softmax, logsumexp,
// attention, rope, rms_norm, argmax; comma-separated), for comparisons and to rule one out.
bool excepted(Op op) {
  static const unsigned mask = [] {
    static const char* names[OPS] = {"sigmoid", "softmax", "logsumexp",
                                     "attention", "rope", "rms_norm", "argmax"};
    const char* env = std::getenv("MLXROUTER_FAST_OPS_EXCEPT");
    unsigned m = 0;
    for (std::string list = env ? env : ""; !list.empty();) {
      const size_t comma = list.find(',');
      const std::string name = list.substr(0, comma);
      for (unsigned i = 0; i < OPS; i++) m |= name == names[i] ? 1u << i : 0;
      list = comma == std::string::npos ? "" : list.substr(comma + 1);
    }
    return m;
  }();
  return mask & (1u << op);
}

bool ours(const array& a, const Stream& s, Op op) {
  return isa != NONE && a.dtype() == float32 && s.device.type == Device::DeviceType::cpu &&
         !excepted(op);
}

}  // namespace

extern "C" {
__attribute__((visibility("default"))) const char* mlxrouter_mlx_ops() {
  return isa == AVX512 ? "avx512" : isa == AVX2 ? "avx2" : "off";
}
// Arrays computed so far by one kernel: 0 sigmoid, 1 softmax, 2 logsumexp, 3 attention,
// 4 rope, 5 rms_norm, 6 argmax.
__attribute__((visibility("default"))) unsigned long mlxrouter_mlx_ops_count(int op) {
  return op >= 0 && op < OPS ? counts[op].load() : 0;
}
// Calls whose items were shared between the pool's threads so far.
__attribute__((visibility("default"))) unsigned long mlxrouter_mlx_ops_shared() {
  return pool.shared_calls.load();
}
// RoPE calls that reused the previous call's cos and sin table so far.
__attribute__((visibility("default"))) unsigned long mlxrouter_mlx_ops_rope_table_hits() {
  return rope_table_hits.load();
}
}

namespace mlx::core {

array sigmoid(const array& a, StreamOrDevice s) {
  using Fn = array (*)(const array&, StreamOrDevice);
  static const Fn mlx_sigmoid = next_definition<Fn>(&sigmoid);
  Stream stream = to_stream(s);
  if (!ours(a, stream, SIGMOID)) return mlx_sigmoid(a, s);
  return array(a.shape(), float32, std::make_shared<FastSigmoid>(stream), {a});
}

array logsumexp(const array& a, const std::vector<int>& axes, bool keepdims, StreamOrDevice s) {
  using Fn = array (*)(const array&, const std::vector<int>&, bool, StreamOrDevice);
  static const Fn mlx_logsumexp = next_definition<Fn>(&logsumexp);
  Stream stream = to_stream(s);
  bool last_axis = axes.size() == 1 && (axes[0] == -1 || axes[0] == static_cast<int>(a.ndim()) - 1);
  if (!ours(a, stream, LOGSUMEXP) || !last_axis || a.ndim() == 0 || a.size() == 0) {
    return mlx_logsumexp(a, axes, keepdims, s);
  }
  auto shape = a.shape();
  shape.back() = 1;
  auto out = array(std::move(shape), float32, std::make_shared<FastLogSumExp>(stream), {a});
  return keepdims ? out : squeeze(out, -1, s);
}

array argmax(const array& a, int axis, bool keepdims, StreamOrDevice s) {
  using Fn = array (*)(const array&, int, bool, StreamOrDevice);
  static const Fn mlx_argmax = next_definition<Fn>(static_cast<Fn>(&argmax));
  Stream stream = to_stream(s);
  const bool last_axis = axis == -1 || axis == static_cast<int>(a.ndim()) - 1;
  if (!ours(a, stream, ARGMAX) || !last_axis || a.ndim() == 0 || a.size() == 0 ||
      a.shape(-1) > static_cast<int64_t>(UINT32_MAX)) {
    return mlx_argmax(a, axis, keepdims, s);
  }
  auto shape = a.shape();
  shape.back() = 1;
  auto out = array(std::move(shape), uint32, std::make_shared<FastArgMax>(stream), {a});
  return keepdims ? out : squeeze(out, -1, s);
}

array softmax(const array& a, const std::vector<int>& axes, bool precise, StreamOrDevice s) {
  using Fn = array (*)(const array&, const std::vector<int>&, bool, StreamOrDevice);
  static const Fn mlx_softmax = next_definition<Fn>(&softmax);
  Stream stream = to_stream(s);
  bool last_axis = axes.size() == 1 && (axes[0] == -1 || axes[0] == static_cast<int>(a.ndim()) - 1);
  if (!ours(a, stream, SOFTMAX) || !last_axis || a.ndim() == 0 || a.size() == 0) {
    return mlx_softmax(a, axes, precise, s);
  }
  return array(a.shape(), float32, std::make_shared<FastSoftmax>(stream, precise), {a});
}

}  // namespace mlx::core

namespace mlx::core::fast {

// One query position against float32 keys and values on the CPU, without sinks: ours (above).
// Everything else, and every malformed call (MLX's checks and messages), is MLX's.
array scaled_dot_product_attention(const array& queries, const array& keys,
                                   const array& values, const float scale,
                                   const std::string& mask_mode, std::optional<array> mask_arr,
                                   const std::optional<array>& sinks, bool force_fused,
                                   StreamOrDevice s) {
  using Fn = array (*)(const array&, const array&, const array&, const float,
                       const std::string&, std::optional<array>, const std::optional<array>&,
                       bool, StreamOrDevice);
  static const Fn mlx_sdpa = next_definition<Fn>(&scaled_dot_product_attention);
  Stream stream = to_stream(s);
  const auto& q = queries;
  const auto& k = keys;
  const auto& v = values;
  const int lanes = isa == AVX512 ? 16 : 8;
  bool fits = ours(q, stream, ATTENTION) && k.dtype() == float32 && v.dtype() == float32 &&
              !sinks && q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && q.shape(2) >= 1 &&
              q.shape(2) <= k.shape(2) &&
              k.shape(0) == q.shape(0) && v.shape(0) == q.shape(0) &&
              k.shape(1) == v.shape(1) && k.shape(2) == v.shape(2) && k.shape(2) > 0 &&
              k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0 && q.shape(3) == k.shape(3) &&
              q.shape(3) % lanes == 0 && v.shape(3) % lanes == 0 && q.shape(0) > 0 &&
              q.shape(1) > 0 && q.shape(3) > 0 && v.shape(3) > 0;  // empty ones: MLX's
  MaskKind kind = NO_MASK;
  if (fits && mask_mode == "causal") {
    fits = !mask_arr;
    kind = q.shape(2) > 1 ? CAUSAL : NO_MASK;  // one query, the last position: every key
  } else if (fits && (mask_mode.empty() || mask_mode == "array") && mask_arr) {
    const array& m = *mask_arr;
    const Shape want = {q.shape(0), q.shape(1), q.shape(2), k.shape(2)};
    fits = m.ndim() <= 4 && (m.dtype() == bool_ || m.dtype() == float32);
    for (int d = 0; fits && d < static_cast<int>(m.ndim()); d++) {
      const int w = want[4 - m.ndim() + d];
      fits = m.shape(d) == 1 || m.shape(d) == w;
    }
    kind = m.dtype() == bool_ ? BOOL_MASK : ADDITIVE_MASK;
  } else if (fits && !mask_mode.empty()) {
    fits = false;
  }
  if (!fits) {
    return mlx_sdpa(queries, keys, values, scale, mask_mode, std::move(mask_arr), sinks,
                    force_fused, s);
  }
  std::vector<array> inputs = {q, k, v};
  if (kind == BOOL_MASK || kind == ADDITIVE_MASK) inputs.push_back(*mask_arr);
  return array({q.shape(0), q.shape(1), q.shape(2), v.shape(3)}, float32,
               std::make_shared<FastAttention>(stream, scale, kind), std::move(inputs));
}

// A float32 array of 4 dimensions on the CPU, rotated forward: ours (above). Everything else,
// and every malformed call (MLX's checks and messages), is MLX's.
array rope(const array& x, int dims, bool traditional, std::optional<float> base, float scale,
           const array& offset, const std::optional<array>& freqs, StreamOrDevice s) {
  using Fn = array (*)(const array&, int, bool, std::optional<float>, float, const array&,
                       const std::optional<array>&, StreamOrDevice);
  static const Fn mlx_rope = next_definition<Fn>(&rope);
  Stream stream = to_stream(s);
  const bool fits =
      ours(x, stream, ROPE) && x.ndim() == 4 && dims > 0 && dims % 2 == 0 && dims <= x.shape(-1) &&
      base.has_value() != freqs.has_value() && offset.ndim() <= 1 &&
      (offset.size() == 1 || offset.size() == static_cast<size_t>(x.shape(0))) &&
      issubdtype(offset.dtype(), integer) &&
      (!freqs || (freqs->ndim() == 1 && freqs->shape(0) == dims / 2 &&
                  issubdtype(freqs->dtype(), floating)));
  if (!fits) return mlx_rope(x, dims, traditional, base, scale, offset, freqs, s);
  std::vector<array> inputs = {x, astype(offset, int32, s)};
  if (freqs) inputs.push_back(astype(*freqs, float32, s));
  return array(x.shape(), float32,
               std::make_shared<FastRope>(stream, dims, traditional, base.value_or(1.0f), scale,
                                          freqs.has_value()),
               std::move(inputs));
}

array rope(const array& x, int dims, bool traditional, std::optional<float> base, float scale,
           int offset, const std::optional<array>& freqs, StreamOrDevice s) {
  using Fn = array (*)(const array&, int, bool, std::optional<float>, float, int,
                       const std::optional<array>&, StreamOrDevice);
  static const Fn mlx_rope = next_definition<Fn>(&rope);
  if (!ours(x, to_stream(s), ROPE)) {
    return mlx_rope(x, dims, traditional, base, scale, offset, freqs, s);
  }
  return rope(x, dims, traditional, base, scale, array(offset, int32), freqs, s);
}

// A float32 array normalized by a float32 weight of its last axis's size, or by none, on the
// CPU: ours (above). Everything else, and every malformed call, is MLX's.
array rms_norm(const array& x, const std::optional<array>& weight, float eps, StreamOrDevice s) {
  using Fn = array (*)(const array&, const std::optional<array>&, float, StreamOrDevice);
  static const Fn mlx_rms_norm = next_definition<Fn>(&rms_norm);
  Stream stream = to_stream(s);
  const bool fits = ours(x, stream, RMS_NORM) && x.ndim() >= 1 && x.size() > 0 &&
                    (!weight || (weight->dtype() == float32 && weight->ndim() == 1 &&
                                 weight->shape(0) == x.shape(-1)));
  if (!fits) return mlx_rms_norm(x, weight, eps, s);
  std::vector<array> inputs = {x};
  if (weight) inputs.push_back(*weight);
  return array(x.shape(), float32,
               std::make_shared<FastRmsNorm>(stream, eps, weight.has_value()),
               std::move(inputs));
}

}  // namespace mlx::core::fast
