// Prompts through the integer GGUF formats (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q3_K .. Q6_K): products
// of many activation rows, where the arithmetic, not the weights' reading, sets the speed.
//
// Decoding a tile of weights to floats for the float panels (dense.h) costs 32 FMAs per 8 rows
// and 32 weights. Here a tile's weights are widened once to int16 codes, each already times its
// sub-block's integer scale, and the activations are quantised to int16 per 32 inputs and packed
// 8 rows at a time, so that one instruction (vpdpwssd, or madd + add without VNNI) multiplies and
// sums 16 pairs: 16 instructions per 8 rows and 32 weights, plus 3-4 that turn each sub-block's
// integer sum float and add its offset term.
//
// Exactness: the weights' integers are exact; the activations keep 16 bits per 32 inputs (about
// 1.5e-5 of the block's largest value), as in the decode steps: greedy output stays fp32's.
// Part of kernels.cpp's one translation unit, after quantized.h, subblocks.h and dense.h.
#pragma once

namespace {

// |code x scale| <= 4096 (Q6_K, summed per 16 inputs), <= 1953 (Q5_K) elsewhere: the products of
// 16 (Q6_K) or 32 inputs fit int32 (16 * 4096 * 32767 < 2^31).
constexpr int kIntMax = 32767;
// From this many activation rows the panels beat the integer dot products of one weight row at a
// time (one-thread 2048 x 2048 products: 8 rows 86-90 GFLOPS against 59-80, 4 rows 40-47 against 66-87).
constexpr int64_t kMinIntPanelRows = 8;

// Activation rows packed for the integer panels: q[p][k][l][h] is input 2k + h of row 8p + l (int16
// pairs, as one int32 lane of vpdpwssd sums them); per panel and block of 32 inputs, each row's
// scale and scale * the block's codes summed (for the formats' offset terms).
struct IntPanels {
    std::vector<int16_t> q;
    std::vector<float> scale, sum;  // [p][block][l]
};

void pack_int_panels(const float* x, int64_t M, int64_t I, IntPanels& r) {
    const int64_t P = (M + kPanel - 1) / kPanel, blocks = I / kGroup;
    r.q.assign(P * I * kPanel, 0);
    r.scale.assign(P * blocks * kPanel, 0.0f);
    r.sum.assign(P * blocks * kPanel, 0.0f);
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            const int64_t p = m / kPanel, l = m % kPanel;
            int16_t* q = r.q.data() + p * I * kPanel + 2 * l;
            for (int64_t b = 0; b < blocks; ++b) {
                const float* v = x + m * I + b * kGroup;
                float amax = 0.0f;
                for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(v[j]));
                const float scale = amax / kIntMax, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
                int qsum = 0;
                for (int j = 0; j < kGroup; ++j) {
                    const int c = std::clamp(static_cast<int>(std::nearbyint(v[j] * inv)), -kIntMax, kIntMax);
                    const int64_t i = b * kGroup + j;
                    q[(i / 2) * 2 * kPanel + i % 2] = static_cast<int16_t>(c);
                    qsum += c;
                }
                r.scale[(p * blocks + b) * kPanel + l] = scale;
                r.sum[(p * blocks + b) * kPanel + l] = scale * static_cast<float>(qsum);
            }
        }
    });
}

// A few weight rows widened: w_i = d[i / 32] * codes[i] + m[i / 32] for each row's I weights.
struct IntTile {
    std::vector<int16_t> codes;  // [row][I]
    std::vector<float> d, m;     // [row][I / 32]
};

inline void store16(int16_t* at, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(at), v); }

// One row of a sub-block format: each sub-block's byte codes widened and multiplied by its
// integer scales (one per 16 weights).
template <SubFormat F>
void widen_sub_row(const uint8_t* row, int64_t I, int16_t* codes, float* d, float* m) {
    for (int64_t b0 = 0; b0 < I / kGroup; b0 += kSubs<F>) {
        unpack<F>(row + b0 / kSubs<F> * kSubBytes<F>, [&](int j, const Sub& s) {
            const int64_t b = b0 + j;
            const __m128i lo = _mm256_castsi256_si128(s.codes), hi = _mm256_extracti128_si256(s.codes, 1);
            const __m256i first = kSignedCodes<F> ? _mm256_cvtepi8_epi16(lo) : _mm256_cvtepu8_epi16(lo);
            const __m256i second = kSignedCodes<F> ? _mm256_cvtepi8_epi16(hi) : _mm256_cvtepu8_epi16(hi);
            store16(codes + b * kGroup, _mm256_mullo_epi16(first, _mm256_permute2x128_si256(s.pairs, s.pairs, 0x00)));
            store16(codes + b * kGroup + 16, _mm256_mullo_epi16(second, _mm256_permute2x128_si256(s.pairs, s.pairs, 0x11)));
            d[b] = s.d;
            m[b] = s.m;
        });
    }
}

// One row of Q4_0 / Q4_1 / Q8_0 blocks: their codes are the widened codes.
template <Format F>
void widen_block_row(const uint8_t* row, int64_t I, int16_t* codes, float* d, float* m) {
    for (int64_t b = 0; b < I / kGroup; ++b) {
        const uint8_t* blk = row + b * block_bytes(F);
        const Codes c = block_codes<F>(blk);
        store16(codes + b * kGroup, c.first);
        store16(codes + b * kGroup + 16, c.second);
        d[b] = half_to_float(blk);
        m[b] = block_offset<F>(blk, d[b]);
    }
}

// The integer formats by their kernels' code (formats.def): Q4_0, Q4_1, Q8_0 are 0..2.
inline bool block_format(int64_t code) { return code >= 0 && code <= static_cast<int64_t>(Format::Q8_0); }
inline bool int_panel_format(int64_t code) { return block_format(code) || sub_format(code).has_value(); }

// Whether a format's weights have an offset term (w = d code + m, m != 0).
inline bool has_offset(int64_t code) {
    if (block_format(code)) return static_cast<Format>(code) != Format::Q8_0;
    bool offset = false;
    with_sub_format(*sub_format(code), [&](auto F) { offset = kOffset<decltype(F)::value>; });
    return offset;
}

inline void widen_row(int64_t code, const uint8_t* row, int64_t I, int16_t* codes, float* d, float* m) {
    if (block_format(code)) {
        with_format(static_cast<Format>(code), [&](auto F) { widen_block_row<decltype(F)::value>(row, I, codes, d, m); });
    } else {
        with_sub_format(*sub_format(code), [&](auto F) { widen_sub_row<decltype(F)::value>(row, I, codes, d, m); });
    }
}

inline __m256i broadcast_pair(const int16_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// OR widened weight rows (tile rows t0 ..) against panels p0 .. p0 + NP, into output columns
// o0 .. o0 + OR of the first `rows` activation rows. Per block of 32 inputs, integer sums in
// registers, then sum * d * the row's scale (+ m * the row's block sum, where the format has
// offsets) into float accumulators. Parts = 2 (Q6_K) turns the sums float every 16 inputs: its
// codes times scales reach 4096, and 32 such products of 16-bit inputs could overflow int32.
// Not inlined, for the same reason as panel_tile.
template <int OR, int NP, bool Offset, int Parts>
__attribute__((noinline)) void int_panel_tile(const IntPanels& x, int64_t p0, int64_t rows, const IntTile& t, int64_t t0,
                                              int64_t I, float* y, int64_t o0, int64_t O, bool add) {
    constexpr int kPairs = kGroup / 2, kPartPairs = kPairs / Parts;
    const int64_t blocks = I / kGroup;
    __m256 acc[OR][NP];
    for (int o = 0; o < OR; ++o)
        for (int p = 0; p < NP; ++p) acc[o][p] = _mm256_setzero_ps();
    const int16_t* codes = t.codes.data() + t0 * I;
    int64_t b = 0;
    do {  // blocks >= 1 (do/while: see panel_tile)
        const int16_t* xb = x.q.data() + (p0 * I + b * kGroup) * kPanel;
        const int64_t at = (p0 * blocks + b) * kPanel;  // panel p's scales at + p * blocks * kPanel
        for (int part = 0; part < Parts; ++part) {
            __m256i sums[OR][NP];
            for (int o = 0; o < OR; ++o)
                for (int p = 0; p < NP; ++p) sums[o][p] = _mm256_setzero_si256();
#pragma GCC unroll 16
            for (int k = part * kPartPairs; k < (part + 1) * kPartPairs; ++k) {
                __m256i xv[NP];
                for (int p = 0; p < NP; ++p)
                    xv[p] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + (p * I + 2 * k) * kPanel));
                for (int o = 0; o < OR; ++o) {
                    const __m256i wv = broadcast_pair(codes + o * I + b * kGroup + 2 * k);
                    for (int p = 0; p < NP; ++p) sums[o][p] = madd_add(sums[o][p], wv, xv[p]);
                }
            }
            __m256 xs[NP];
            for (int p = 0; p < NP; ++p) xs[p] = _mm256_loadu_ps(x.scale.data() + at + p * blocks * kPanel);
            for (int o = 0; o < OR; ++o) {
                const __m256 dv = _mm256_set1_ps(t.d[(t0 + o) * blocks + b]);
                for (int p = 0; p < NP; ++p)
                    acc[o][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[o][p]), _mm256_mul_ps(dv, xs[p]), acc[o][p]);
            }
        }
        if constexpr (Offset) {
            __m256 xm[NP];
            for (int p = 0; p < NP; ++p) xm[p] = _mm256_loadu_ps(x.sum.data() + at + p * blocks * kPanel);
            for (int o = 0; o < OR; ++o) {
                const __m256 mv = _mm256_set1_ps(t.m[(t0 + o) * blocks + b]);
                for (int p = 0; p < NP; ++p) acc[o][p] = _mm256_fmadd_ps(mv, xm[p], acc[o][p]);
            }
        }
    } while (++b < blocks);
    alignas(32) float tile[OR][NP][kPanel];
    for (int o = 0; o < OR; ++o)
        for (int p = 0; p < NP; ++p) _mm256_store_ps(tile[o][p], acc[o][p]);
    scatter_tile(&tile[0][0][0], OR, NP, p0 * kPanel, rows, y, o0, O, add);
}

// With AVX-512's 32 vector registers a tile keeps 4 x 3 integer sums and as many float
// accumulators; with AVX2's 16, 2 x 2.
#if defined(__AVX512VL__)
constexpr int kIntRowsO = 4, kIntPanelsAtOnce = 3;
#else
constexpr int kIntRowsO = 2, kIntPanelsAtOnce = 2;
#endif

template <int OR, bool Offset, int Parts>
void int_panel_tiles(const IntPanels& x, int64_t M, const IntTile& t, int64_t I, float* y, int64_t o0, int64_t O,
                     bool add) {
    const int64_t P = (M + kPanel - 1) / kPanel;
    int64_t p = 0;
    for (; p + kIntPanelsAtOnce <= P; p += kIntPanelsAtOnce)
        int_panel_tile<OR, kIntPanelsAtOnce, Offset, Parts>(x, p, M, t, 0, I, y, o0, O, add);
    with_count<kIntPanelsAtOnce - 1>(P - p, [&](auto n) {
        int_panel_tile<OR, decltype(n)::value, Offset, Parts>(x, p, M, t, 0, I, y, o0, O, add);
    });
}

// Output rows o_begin .. o_end of a weight in an integer format (its kernels' code) against every
// panel: a tile of rows is widened once (a few KB per row, from cache for every panel after the first).
void int_panel_block(int64_t code, int64_t row_bytes, const IntPanels& x, const uint8_t* w, float* y, int64_t M,
                     int64_t I, int64_t O, int64_t o_begin, int64_t o_end, bool add) {
    const int64_t blocks = I / kGroup;
    const bool offset = has_offset(code), halves = sub_format(code) == SubFormat::Q6_K;
    IntTile t;
    t.codes.resize(kIntRowsO * I);
    t.d.resize(kIntRowsO * blocks);
    t.m.resize(kIntRowsO * blocks);
    for (int64_t o = o_begin; o < o_end; o += kIntRowsO) {
        const int64_t n = std::min<int64_t>(kIntRowsO, o_end - o);
        for (int64_t r = 0; r < n; ++r)
            widen_row(code, w + (o + r) * row_bytes, I, t.codes.data() + r * I, t.d.data() + r * blocks, t.m.data() + r * blocks);
        with_count<kIntRowsO>(n, [&](auto c) {
            constexpr int R = decltype(c)::value;
            if (offset) int_panel_tiles<R, true, 1>(x, M, t, I, y, o, O, add);
            else if (halves) int_panel_tiles<R, false, 2>(x, M, t, I, y, o, O, add);
            else int_panel_tiles<R, false, 1>(x, M, t, I, y, o, O, add);
        });
    }
}
}  // namespace
