// Float products: streaming rows for a few activation rows, register-tiled panels for more (the
// F32 / BF16 weights, and F16 / Q2_K rows decoded to floats).
// Part of kernels.cpp's one translation unit, which includes torch, AVX2 and blocks.h first and
// then, in this order: quantized.h, subblocks.h, dense.h, int_panels.h, weights.h, attention.h.
#pragma once

namespace {

// One weight row against R activation rows (R a compile-time constant, so the accumulators live
// in registers), with two accumulators per row to hide the FMA latency. One weight row at a time:
// a single sequential stream per thread is what the hardware prefetcher follows best (measured
// here: 27 GB/s, against 23 GB/s for two rows read side by side). W: float (fp32) or uint16_t (bf16).
template <int R, typename W>
inline void dense_row(const float* x, int64_t m0, const W* w, int64_t I, float* y, int64_t O, bool add) {
    __m256 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
        const __m256 v0 = load8(w + i), v1 = load8(w + i + 8);
        for (int r = 0; r < R; ++r) {
            const float* xr = x + (m0 + r) * I + i;
            a[r] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xr), a[r]);
            b[r] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xr + 8), b[r]);
        }
    }
    for (; i + 8 <= I; i += 8) {
        const __m256 v0 = load8(w + i);
        for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + (m0 + r) * I + i), a[r]);
    }
    for (int r = 0; r < R; ++r) {
        const float* xr = x + (m0 + r) * I;
        float sum = hsum(_mm256_add_ps(a[r], b[r]));
        for (int64_t j = i; j < I; ++j) sum += load1(w + j) * xr[j];
        float& out = y[(m0 + r) * O];
        out = add ? out + sum : sum;
    }
}

template <typename W>
void dense_rows(const float* x, const W* w, float* y, int64_t M, int64_t I, int64_t O, int64_t o_begin,
                int64_t o_end, bool add) {
    for (int64_t o = o_begin; o < o_end; ++o) {
        const W* row = w + o * I;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) dense_row<4>(x, m0, row, I, y + o, O, add);
        with_count<3>(M - m0, [&](auto r) { dense_row<decltype(r)::value>(x, m0, row, I, y + o, O, add); });
    }
}

// Many activation rows make the product compute-bound: then what counts is keeping both FMA
// units busy. x is transposed into panels of 8 rows, so that a vector holds one input feature
// of 8 activation rows, and each weight is broadcast from memory. A tile of OR weight rows by
// NP panels keeps OR x NP accumulators (6 x 2 = 12, with 2 activation vectors and the broadcast
// weight: 15 of the 16 registers) and needs no horizontal sums; the weight rows are read as
// sequential streams. (An earlier tile of dot products, 3 activation rows by 4 weight rows,
// reached half of this: its activation loads came from L2.)
constexpr int kPanel = 8, kPanelRowsO = 6, kPanelsAtOnce = 2;

// panels[p][i][l] = x[8p + l][i], zeros past the last row.
void pack_panels(const float* x, int64_t M, int64_t I, std::vector<float>& panels) {
    const int64_t P = (M + kPanel - 1) / kPanel;
    panels.assign(P * I * kPanel, 0.0f);
    for (int64_t m = 0; m < M; ++m) {
        float* out = panels.data() + (m / kPanel) * I * kPanel + m % kPanel;
        const float* row = x + m * I;
        for (int64_t i = 0; i < I; ++i) out[i * kPanel] = row[i];
    }
}

inline __m256 broadcast1(const float* w) { return _mm256_broadcast_ss(w); }
inline __m256 broadcast1(const uint16_t* w) { return _mm256_set1_ps(load1(w)); }

// y[m0 + 8p + l, o0 + o] (=, or += with `add`) tile[o][p][l], for the real activation rows only.
__attribute__((noinline)) void scatter_tile(const float* tile, int OR, int NP, int64_t m0, int64_t rows, float* y,
                                            int64_t o0, int64_t O, bool add) {
    for (int p = 0; p < NP; ++p) {
        const int64_t first = m0 + p * kPanel, real = std::min<int64_t>(kPanel, rows - first);
        for (int o = 0; o < OR; ++o) {
            const float* lanes = tile + (o * NP + p) * kPanel;
            for (int64_t l = 0; l < real; ++l) {
                float& out = y[(first + l) * O + o0 + o];
                out = add ? out + lanes[l] : lanes[l];
            }
        }
    }
}

// OR weight rows (from wr, I apart) against panels p0 .. p0 + NP (activation rows 8 p0 ..
// 8 p0 + 8 NP, of which the first `rows` are real), into output columns o0 .. o0 + OR.
// Not inlined: inlined into its callers' loops, GCC again kept some tiles' accumulators on the stack.
template <int OR, int NP, typename W>
__attribute__((noinline)) void panel_tile(const float* panels, int64_t p0, int64_t rows, const W* wr, int64_t I, float* y, int64_t o0,
                       int64_t O, bool add) {
    __m256 acc[OR][NP];
    for (int o = 0; o < OR; ++o)
        for (int p = 0; p < NP; ++p) acc[o][p] = _mm256_setzero_ps();
    const float* xp = panels + p0 * I * kPanel;
    // do/while, not for: with a loop that might run zero times, GCC keeps acc in memory and
    // stores all 12 accumulators on every step (measured: half the speed). I >= 1 always. (The
    // build's -fno-tree-loop-distribute-patterns stops the same thing via the zeroing above.)
    int64_t i = 0;
    do {
        __m256 xv[NP];
        for (int p = 0; p < NP; ++p) xv[p] = _mm256_loadu_ps(xp + (p * I + i) * kPanel);
        for (int o = 0; o < OR; ++o) {
            const __m256 wv = broadcast1(wr + o * I + i);
            for (int p = 0; p < NP; ++p) acc[o][p] = _mm256_fmadd_ps(wv, xv[p], acc[o][p]);
        }
    } while (++i < I);
    // Scattered by a separate function that sees only memory, so acc stays in registers above.
    alignas(32) float tile[OR][NP][kPanel];
    for (int o = 0; o < OR; ++o)
        for (int p = 0; p < NP; ++p) _mm256_store_ps(tile[o][p], acc[o][p]);
    scatter_tile(&tile[0][0][0], OR, NP, p0 * kPanel, rows, y, o0, O, add);
}

// Calls tile(p, std::integral_constant<int, n>{}) for the panels of M activation rows in groups
// of n = NP from panel p, the last group smaller: how every panel product walks its panels.
template <int NP, typename Fn>
inline void panel_groups(int64_t M, Fn&& tile) {
    const int64_t P = (M + kPanel - 1) / kPanel;
    int64_t p = 0;
    for (; p + NP <= P; p += NP) tile(p, std::integral_constant<int, NP>{});
    with_count<NP - 1>(P - p, [&](auto n) { tile(p, n); });
}

// OR weight rows against every panel: the rows come from memory on the first tile and from
// cache on the others.
template <int OR, typename W>
inline void panel_tiles(const float* panels, int64_t M, const W* wr, int64_t I, float* y, int64_t o0, int64_t O,
                        bool add) {
    panel_groups<kPanelsAtOnce>(M, [&](int64_t p, auto n) {
        panel_tile<OR, decltype(n)::value>(panels, p, M, wr, I, y, o0, O, add);
    });
}

template <typename W>
void panel_block(const float* panels, const W* w, float* y, int64_t M, int64_t I, int64_t O, int64_t o_begin,
                 int64_t o_end, bool add) {
    int64_t o = o_begin;
    for (; o + kPanelRowsO <= o_end; o += kPanelRowsO) panel_tiles<kPanelRowsO>(panels, M, w + o * I, I, y, o, O, add);
    with_count<kPanelRowsO - 1>(o_end - o, [&](auto c) {
        panel_tiles<decltype(c)::value>(panels, M, w + o * I, I, y, o, O, add);
    });
}

// A grain of 16 output rows keeps threads busy on the small (192-row) products too.
constexpr int64_t kGrain = 16;

// Which loop a dense product takes, by activation rows (measured on this 2-core CPU, fp32):
// up to 8 rows a step is bound by reading the weights, and dense_rows streams them best; from
// there to 256 rows it is compute-bound and the panels run 1.3-2x faster than torch's product
// (64 rows: 135-185 GFLOPS against 120-135); beyond, torch's product (MKL) is as fast: prompts.
constexpr int64_t kMaxStreamRows = 8, kMaxPanelRows = 256;
// Decoded formats (F16, Q2_K): from this many rows, decoding a tile of weight rows to floats for
// the panels beats decoding each row once per 4 activation rows.
constexpr int64_t kMinDecodedPanelRows = 16;
}  // namespace
