// mlxrouter's vectorized MLX CPU kernels, preloaded into Linux x86-64 workers.
//
// The mlx[cpu] wheel computes exp one float at a time on x86 (its SIMD layer has one lane
// there), through libm's fmaf: about 17 ns per value. On SmolLM2-135M that made the SiLU of
// every MLP (an exp per hidden unit) a quarter of prefill and a tenth of an 8-stream decode
// step, attention's softmax most of another fifth of prefill, and the logsumexp that mlx-lm's
// batch step takes over the whole vocabulary another tenth of a decode step.
//
// This library defines mlx::core::sigmoid, softmax and logsumexp, which the mlx Python module
// and libmlx itself (attention) call through the dynamic linker, so that preloaded ours come
// first. For float32
// arrays on the CPU they build the same graph MLX would, with a primitive of ours in place of
// MLX's; every other case is handed to MLX's own function. Our primitives run the very
// operations MLX's scalar code runs, in the same order (the same polynomial, the same fused
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

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "mlx/backend/common/unary.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/simd/simd.h"
#include "mlx/backend/cpu/unary_ops.h"
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
enum Op { SIGMOID = 0, SOFTMAX = 1, LOGSUMEXP = 2 };
std::atomic<unsigned long> counts[3];

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

// ---- the primitives

// f(r, offset of row r) for every row of `a` (all but its last axis) in row-major order.
template <typename F>
void for_each_row(const array& a, F f) {
  const int axes = a.ndim() > 1 ? static_cast<int>(a.ndim()) - 1 : 0;
  const size_t rows = a.ndim() ? a.size() / a.shape(-1) : 1;
  std::vector<int> index(axes, 0);
  int64_t offset = 0;
  for (size_t r = 0; r < rows; r++) {
    f(r, offset);
    for (int d = axes - 1; d >= 0; d--) {  // the next row, odometer-style
      offset += a.strides()[d];
      if (++index[d] < a.shape(d)) break;
      offset -= a.strides()[d] * a.shape(d);
      index[d] = 0;
    }
  }
}

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
      } else if (isa == AVX512) {
        sigmoid512(in.data<float>(), out.data<float>(), in.data_size());
      } else {
        sigmoid256(in.data<float>(), out.data<float>(), in.data_size());
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

class FastLogSumExp : public UnaryPrimitive {
 public:
  explicit FastLogSumExp(Stream stream) : UnaryPrimitive(stream) {}

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
      std::vector<float> row(stride == 1 ? 0 : n);
      for_each_row(in, [&](size_t r, int64_t offset) {
        const float* x = src + offset;
        if (stride != 1) {
          for (size_t j = 0; j < n; j++) row[j] = x[j * stride];
          x = row.data();
        }
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
    auto x = inputs[0];
    int ax = axes[0];
    if (ax == static_cast<int>(x.ndim()) - 1) {  // keep the reduced axis last
      x = moveaxis(x, ax, 0, stream());
      ax = 0;
    }
    return {{logsumexp(x, std::vector<int>{-1}, true, stream())}, {ax}};
  }
  const char* name() const override { return "LogSumExp"; }
  bool is_equivalent(const Primitive&) const override { return true; }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    auto s = inputs[0].shape();
    s.back() = 1;
    return {s};
  }
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

bool ours(const array& a, const Stream& s) {
  return isa != NONE && a.dtype() == float32 && s.device.type == Device::DeviceType::cpu;
}

}  // namespace

extern "C" {
__attribute__((visibility("default"))) const char* mlxrouter_mlx_ops() {
  return isa == AVX512 ? "avx512" : isa == AVX2 ? "avx2" : "off";
}
// Arrays computed so far by one kernel: 0 sigmoid, 1 softmax, 2 logsumexp.
__attribute__((visibility("default"))) unsigned long mlxrouter_mlx_ops_count(int op) {
  return op >= 0 && op < 3 ? counts[op].load() : 0;
}
}

namespace mlx::core {

array sigmoid(const array& a, StreamOrDevice s) {
  using Fn = array (*)(const array&, StreamOrDevice);
  static const Fn mlx_sigmoid = next_definition<Fn>(&sigmoid);
  Stream stream = to_stream(s);
  if (!ours(a, stream)) return mlx_sigmoid(a, s);
  return array(a.shape(), float32, std::make_shared<FastSigmoid>(stream), {a});
}

array logsumexp(const array& a, const std::vector<int>& axes, bool keepdims, StreamOrDevice s) {
  using Fn = array (*)(const array&, const std::vector<int>&, bool, StreamOrDevice);
  static const Fn mlx_logsumexp = next_definition<Fn>(&logsumexp);
  Stream stream = to_stream(s);
  bool last_axis = axes.size() == 1 && (axes[0] == -1 || axes[0] == static_cast<int>(a.ndim()) - 1);
  if (!ours(a, stream) || !last_axis || a.ndim() == 0 || a.size() == 0) {
    return mlx_logsumexp(a, axes, keepdims, s);
  }
  auto shape = a.shape();
  shape.back() = 1;
  auto out = array(std::move(shape), float32, std::make_shared<FastLogSumExp>(stream), {a});
  return keepdims ? out : squeeze(out, -1, s);
}

array softmax(const array& a, const std::vector<int>& axes, bool precise, StreamOrDevice s) {
  using Fn = array (*)(const array&, const std::vector<int>&, bool, StreamOrDevice);
  static const Fn mlx_softmax = next_definition<Fn>(&softmax);
  Stream stream = to_stream(s);
  bool last_axis = axes.size() == 1 && (axes[0] == -1 || axes[0] == static_cast<int>(a.ndim()) - 1);
  if (!ours(a, stream) || !last_axis || a.ndim() == 0 || a.size() == 0) {
    return mlx_softmax(a, axes, precise, s);
  }
  return array(a.shape(), float32, std::make_shared<FastSoftmax>(stream, precise), {a});
}

}  // namespace mlx::core
