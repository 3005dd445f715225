// One instance of the decode attention kernel, included by mlx_ops.cpp once per instruction set
// with these defined (and undefined at the end):
//   NAME(x)  the instance's names    LANES  floats per vector    TARGET  the instruction set
//   ROWS     the Softmax rows struct of that instruction set (max, exp_minus, scale)
//
// NAME(attend) computes, for one sequence and one key-value head, the `group` query heads
// that share it: scores = q K^T (q already scaled) plus the mask, softmax over the keys, then
// the scores times V. K and V are read once for the whole group: the scores with each key
// row loaded once for every query head, the output a column block at a time with its
// accumulators in registers. Head sizes are whole vectors (the caller checks).

#ifndef PREFETCH
#define PREFETCH 16  // rows of K or V fetched ahead of their use
#endif

typedef float NAME(vec) __attribute__((vector_size(LANES * sizeof(float)), aligned(4),
                                        may_alias));

// a * b + c, rounded once.
TARGET static inline __attribute__((always_inline)) NAME(vec) NAME(fma)(NAME(vec) a, NAME(vec) b,
                                                                       NAME(vec) c) {
#if LANES == 16
  return (NAME(vec))_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  return (NAME(vec))_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#endif
}

TARGET static inline __attribute__((always_inline)) float NAME(hsum)(NAME(vec) v) {
#if LANES == 16
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256((__m512)v),
                           _mm512_extractf32x8_ps((__m512)v, 1));
#else
  __m256 h = (__m256)v;
#endif
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// out[r][c] = sum over t of p[r][t] v[t][c] for rows x cols vectors (constants where
// inlined, so the accumulators stay in registers); p's rows are T apart.
TARGET static inline __attribute__((always_inline)) void NAME(block)(
    int rows, int cols, int T, const float* p, const float* v, int64_t v_step, float* out,
    int dv) {
  NAME(vec) acc[4][4] = {};
  for (int t = 0; t < T; t++) {
    NAME(vec) vt[4];
    __builtin_prefetch(v + (t + PREFETCH) * v_step);
    if (cols * LANES > 16) __builtin_prefetch(v + (t + PREFETCH) * v_step + 16);
    if (cols * LANES > 32) __builtin_prefetch(v + (t + PREFETCH) * v_step + 32);
    if (cols * LANES > 48) __builtin_prefetch(v + (t + PREFETCH) * v_step + 48);
    _Pragma("GCC unroll 4") for (int c = 0; c < cols; c++)
      vt[c] = *(const NAME(vec)*)(v + t * v_step + c * LANES);
    _Pragma("GCC unroll 4") for (int r = 0; r < rows; r++) {
      const float w = p[static_cast<int64_t>(r) * T + t];
      const NAME(vec) wv = w - (NAME(vec)){};  // w in every lane
      _Pragma("GCC unroll 4") for (int c = 0; c < cols; c++)
        acc[r][c] = NAME(fma)(wv, vt[c], acc[r][c]);
    }
  }
  _Pragma("GCC unroll 4") for (int r = 0; r < rows; r++)
    _Pragma("GCC unroll 4") for (int c = 0; c < cols; c++)
      *(NAME(vec)*)(out + static_cast<int64_t>(r) * dv + c * LANES) = acc[r][c];
}

TARGET static void NAME(weigh)(int rows, int cols, int T, const float* p, const float* v,
                               int64_t v_step, float* out, int dv) {
  switch (rows * 4 + cols) {  // every case a constant block
#define CASE(R, C) case R * 4 + C: NAME(block)(R, C, T, p, v, v_step, out, dv); break;
    CASE(1, 1) CASE(2, 1) CASE(3, 1) CASE(4, 1) CASE(1, 4) CASE(2, 4) CASE(3, 4) CASE(4, 4)
#undef CASE
  }
}

// mask: NO_MASK, or per query head r a row of T values at masks[r] with stride mask_step
// (bool: keep or skip the key; float: added to its score).
TARGET static void NAME(attend)(int group, int T, int dk, int dv, const float* q,
                                const float* k, int64_t k_step, const float* v,
                                int64_t v_step, MaskKind kind, const void* const* masks,
                                int64_t mask_step, float* scores, float* out) {
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  const int kc = dk / LANES, vc = dv / LANES;
  auto store = [&](int r, int t, float s) {
    if (kind == BOOL_MASK) {
      s = static_cast<const bool*>(masks[r])[t * mask_step] ? s : NEG_INF;
    } else if (kind == ADDITIVE_MASK) {
      s += static_cast<const float*>(masks[r])[t * mask_step];
    }
    scores[static_cast<int64_t>(r) * T + t] = s;
  };
  // Four keys at a time: each score is the same chain of multiply-adds over the head as one
  // key alone (so the same bits), but four chains run side by side instead of one waiting on
  // the last's latency (with AVX2 a 64-wide head is a chain of 8).
  int t = 0;
  for (; t + 4 <= T; t += 4) {
    const float* kt = k + t * k_step;
    for (int j = 0; j < 4; j++)  // the rows PREFETCH ahead, line by line
      for (int c = 0; c < kc; c += 64 / (LANES * 4))
        __builtin_prefetch(kt + (PREFETCH + j) * k_step + c * LANES);
    for (int r = 0; r < group; r++) {
      const float* qr = q + static_cast<int64_t>(r) * dk;
      NAME(vec) qv = *(const NAME(vec)*)qr;
      NAME(vec) a0 = qv * *(const NAME(vec)*)kt, a1 = qv * *(const NAME(vec)*)(kt + k_step),
                a2 = qv * *(const NAME(vec)*)(kt + 2 * k_step),
                a3 = qv * *(const NAME(vec)*)(kt + 3 * k_step);
      for (int c = 1; c < kc; c++) {
        qv = *(const NAME(vec)*)(qr + c * LANES);
        a0 = NAME(fma)(qv, *(const NAME(vec)*)(kt + c * LANES), a0);
        a1 = NAME(fma)(qv, *(const NAME(vec)*)(kt + k_step + c * LANES), a1);
        a2 = NAME(fma)(qv, *(const NAME(vec)*)(kt + 2 * k_step + c * LANES), a2);
        a3 = NAME(fma)(qv, *(const NAME(vec)*)(kt + 3 * k_step + c * LANES), a3);
      }
      store(r, t, NAME(hsum)(a0));
      store(r, t + 1, NAME(hsum)(a1));
      store(r, t + 2, NAME(hsum)(a2));
      store(r, t + 3, NAME(hsum)(a3));
    }
  }
  for (; t < T; t++) {
    const float* kt = k + t * k_step;
    for (int c = 0; c < kc; c += 64 / (LANES * 4))  // the row PREFETCH ahead, line by line
      __builtin_prefetch(kt + PREFETCH * k_step + c * LANES);
    for (int r = 0; r < group; r++) {
      const float* qr = q + static_cast<int64_t>(r) * dk;
      NAME(vec) acc = *(const NAME(vec)*)qr * *(const NAME(vec)*)kt;
      for (int c = 1; c < kc; c++)
        acc = NAME(fma)(*(const NAME(vec)*)(qr + c * LANES), *(const NAME(vec)*)(kt + c * LANES),
                        acc);
      store(r, t, NAME(hsum)(acc));
    }
  }
  // The softmax of every row: exps vectorized, each sum in order from the first key (the
  // rows' sums interleaved). A row whose keys are all masked gets equal weights, as in MLX
  // (there its masked scores are all the lowest float).
  float sums[8];
  for (int r0 = 0; r0 < group; r0 += 8) {
    const int rows = group - r0 < 8 ? group - r0 : 8;
    for (int r = 0; r < rows; r++) {
      float* p = scores + static_cast<int64_t>(r0 + r) * T;
      float m = ROWS::max(p, T);
      if (kind == BOOL_MASK && m == NEG_INF) {
        std::fill(p, p + T, 0.0f);
        m = 0.0f;
      }
      ROWS::exp_minus(p, p, T, m);
      sums[r] = 0.0f;
    }
    for (int t = 0; t < T; t++)
      for (int r = 0; r < rows; r++) sums[r] += scores[static_cast<int64_t>(r0 + r) * T + t];
    for (int r = 0; r < rows; r++)
      ROWS::scale(scores + static_cast<int64_t>(r0 + r) * T, T, 1 / sums[r]);
  }
  // out[r] = sum over t of p[r][t] V[t]: blocks of up to 4 query heads by 4 vectors of
  // columns (a row of V of 64 floats), their 16 accumulators in registers while V streams.
  for (int r0 = 0; r0 < group; r0 += 4) {
    const int rows = group - r0 < 4 ? group - r0 : 4;
    const float* p = scores + static_cast<int64_t>(r0) * T;
    int c = 0;
    for (; c + 4 <= vc; c += 4)
      NAME(weigh)(rows, 4, T, p, v + c * LANES, v_step, out + r0 * dv + c * LANES, dv);
    for (; c < vc; c++)
      NAME(weigh)(rows, 1, T, p, v + c * LANES, v_step, out + r0 * dv + c * LANES, dv);
  }
}

#undef NAME
#undef LANES
#undef TARGET
#undef ROWS
