// Prompts through the integer GGUF formats (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q3_K .. Q6_K): products
// of many activation rows, where the arithmetic, not the weights' reading, sets the speed.
//
// Decoding a tile of weights to floats for the float panels (dense.h) costs 32 FMAs per 8 rows
// and 32 weights. Here the activations are quantised per 32 inputs and packed 8 rows at a time,
// a tile's weights are unpacked once into plain integer codes, and one instruction multiplies a
// few codes of one weight row with 8 rows and sums them in each int32 lane:
//   int16 (the default): codes already times their sub-block's integer scale, pairs summed by
//     vpdpwssd (madd + add without VNNI): 16 instructions per 8 rows and 32 weights, plus 3-4
//     that turn a sub-block's sum float and add its offset term. The activations keep 16 bits
//     (about 1.5e-5 of a block's largest value), as in the decode steps: greedy output stays fp32's.
//   bytes (--int8-activations, with VNNI): unsigned codes (signed formats moved up by a bias that
//     the offset term takes back) times signed activation bytes, quads summed by vpdpbusd: 8 per
//     32 weights; the integer scales join the float factor, per 16 weights for Q3_K and Q6_K.
// Part of kernels.cpp's one translation unit, after quantized.h, subblocks.h and dense.h.
#pragma once

namespace {

// From this many activation rows the panels beat the integer dot products of one weight row at a
// time (one-thread 2048 x 2048 products: 8 rows 86-90 GFLOPS against 59-80, 4 rows 40-47 against 66-87).
constexpr int64_t kMinIntPanelRows = 8;
// Byte panels need vpdpbusd: maddubs, AVX2's byte product, saturates on Q8_0's biased codes.
constexpr bool kHasBytePanels = GENKIT_VNNI;
constexpr int64_t kHalf = kGroup / 2;  // the k-quants' scales of Q3_K and Q6_K hold for 16 weights

// The activations' code type Q (int16_t, int8_t) sets the rest: the weights' code type and how
// many inputs one int32 lane sums.
//   int16: |code x scale| <= 4096 (Q6_K, summed per 16 inputs), <= 1953 (Q5_K) elsewhere, so the
//          products of 16 (Q6_K) or 32 inputs fit int32 (16 * 4096 * 32767 < 2^31).
template <typename Q>
struct Codes16or8 {
    static constexpr bool kBytes = std::is_same_v<Q, int8_t>;
    static constexpr int kPerLane = kBytes ? 4 : 2;
    using W = std::conditional_t<kBytes, uint8_t, int16_t>;
};

// Activation rows packed for the panels: q[p][k][l][j] is input kPerLane k + j of row 8p + l; per
// panel, each row's scale per block of 32 inputs and scale * its codes' sum per 16 inputs.
template <typename Q>
struct QuantPanels {
    std::vector<Q> q;
    std::vector<float> scale;  // [p][I / 32][l]
    std::vector<float> sum;    // [p][I / 16][l]
};
using IntPanels = QuantPanels<int16_t>;
using BytePanels = QuantPanels<int8_t>;

template <typename Q>
void pack_quant_panels(const float* x, int64_t M, int64_t I, QuantPanels<Q>& r) {
    constexpr int kLane = Codes16or8<Q>::kPerLane;
    const int64_t P = (M + kPanel - 1) / kPanel, blocks = I / kGroup;
    r.q.assign(P * I * kPanel, 0);
    r.scale.assign(P * blocks * kPanel, 0.0f);
    r.sum.assign(P * 2 * blocks * kPanel, 0.0f);
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
        alignas(32) Q codes[kGroup];
        for (int64_t m = begin; m < end; ++m) {
            const int64_t p = m / kPanel, l = m % kPanel;
            // a row's kLane codes are one int32 of a panel, 8 rows apart
            int32_t* lanes = reinterpret_cast<int32_t*>(r.q.data() + p * I * kPanel) + l;
            for (int64_t b = 0; b < blocks; ++b) {
                const float scale = quantize_block(x + m * I + b * kGroup, codes);
                r.scale[(p * blocks + b) * kPanel + l] = scale;
                for (int h = 0; h < 2; ++h) {
                    int sum = 0;
                    for (int j = h * kHalf; j < (h + 1) * kHalf; ++j) sum += codes[j];
                    r.sum[(p * 2 * blocks + 2 * b + h) * kPanel + l] = scale * static_cast<float>(sum);
                }
                for (int c = 0; c < kGroup / kLane; ++c)
                    std::memcpy(lanes + (b * kGroup / kLane + c) * kPanel, codes + c * kLane, 4);
            }
        }
    });
}

// A few weight rows unpacked: w_i = d[i / 16] * codes[i] + m[i / 16] for each row's I weights.
template <typename W>
struct QuantTile {
    std::vector<W> codes;     // [row][I]
    std::vector<float> d, m;  // [row][I / 16]
};

inline void store32(void* at, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(at), v); }

// The integer scale of a sub-block's first (h = 0) or last 16 weights.
inline int pair_scale(const Sub& s, int h) {
    return static_cast<int16_t>(h ? _mm256_extract_epi16(s.pairs, 8) : _mm256_extract_epi16(s.pairs, 0));
}

// One row of a sub-block format. int16: each sub-block's codes widened and times their integer
// scales. Bytes: codes as they are, signed ones (Q3_K, Q6_K) moved up by a bias to unsigned.
template <typename W, SubFormat F>
void unpack_sub_row(const uint8_t* row, int64_t I, W* codes, float* d, float* m) {
    constexpr int kBias = F == SubFormat::Q6_K ? 32 : F == SubFormat::Q3_K ? 4 : 0;
    for (int64_t b0 = 0; b0 < I / kGroup; b0 += kSubs<F>) {
        unpack<F>(row + b0 / kSubs<F> * kSubBytes<F>, [&](int j, const Sub& s) {
            const int64_t b = b0 + j;
            if constexpr (std::is_same_v<W, int16_t>) {
                const __m128i lo = _mm256_castsi256_si128(s.codes), hi = _mm256_extracti128_si256(s.codes, 1);
                const __m256i first = kSignedCodes<F> ? _mm256_cvtepi8_epi16(lo) : _mm256_cvtepu8_epi16(lo);
                const __m256i second = kSignedCodes<F> ? _mm256_cvtepi8_epi16(hi) : _mm256_cvtepu8_epi16(hi);
                store32(codes + b * kGroup, _mm256_mullo_epi16(first, _mm256_permute2x128_si256(s.pairs, s.pairs, 0x00)));
                store32(codes + b * kGroup + kHalf, _mm256_mullo_epi16(second, _mm256_permute2x128_si256(s.pairs, s.pairs, 0x11)));
                d[2 * b] = d[2 * b + 1] = s.d;
                m[2 * b] = m[2 * b + 1] = s.m;
            } else {
                store32(codes + b * kGroup, _mm256_add_epi8(s.codes, _mm256_set1_epi8(kBias)));
                for (int h = 0; h < 2; ++h) {
                    d[2 * b + h] = s.d * static_cast<float>(pair_scale(s, h));
                    m[2 * b + h] = s.m - kBias * d[2 * b + h];
                }
            }
        });
    }
}

// One row of Q4_0 / Q4_1 / Q8_0 blocks (no integer scales). Bytes: Q8_0's codes moved up by 128.
template <typename W, Format F>
void unpack_block_row(const uint8_t* row, int64_t I, W* codes, float* d, float* m) {
    for (int64_t b = 0; b < I / kGroup; ++b) {
        const uint8_t* blk = row + b * block_bytes(F);
        const float scale = half_to_float(blk);
        float offset = block_offset<F>(blk, scale);
        if constexpr (std::is_same_v<W, int16_t>) {
            const Codes c = block_codes<F>(blk);
            store32(codes + b * kGroup, c.first);
            store32(codes + b * kGroup + kHalf, c.second);
        } else if constexpr (F == Format::Q8_0) {
            store32(codes + b * kGroup, _mm256_xor_si256(load32(blk + kCodesAt<F>), _mm256_set1_epi8(-128)));
            offset = -128.0f * scale;
        } else {
            store32(codes + b * kGroup, q4_bytes(blk + kCodesAt<F>));
        }
        d[2 * b] = d[2 * b + 1] = scale;
        m[2 * b] = m[2 * b + 1] = offset;
    }
}

// The integer formats by their kernels' code (formats.def): Q4_0, Q4_1, Q8_0 are 0..2.
inline bool block_format(int64_t code) { return code >= 0 && code <= static_cast<int64_t>(Format::Q8_0); }
inline bool int_panel_format(int64_t code) { return block_format(code) || sub_format(code).has_value(); }

template <typename W>
void unpack_row(int64_t code, const uint8_t* row, int64_t I, W* codes, float* d, float* m) {
    if (block_format(code)) {
        with_format(static_cast<Format>(code), [&](auto F) { unpack_block_row<W, decltype(F)::value>(row, I, codes, d, m); });
    } else {
        with_sub_format(*sub_format(code), [&](auto F) { unpack_sub_row<W, decltype(F)::value>(row, I, codes, d, m); });
    }
}

// How a format's tile is multiplied: whether its weights have offset terms (w = d code + m, m != 0:
// every format in bytes, where the biases are offsets) and whether its sums turn float per 16
// inputs (Parts = 2: Q6_K in int16, its scaled codes reaching 4096; Q3_K and Q6_K in bytes, their
// integer scales changing every 16 weights).
struct TileKind {
    bool offset;
    int parts;
};

template <typename Q>
TileKind tile_kind(int64_t code) {
    const auto sub = sub_format(code);
    if constexpr (Codes16or8<Q>::kBytes) {
        return {true, sub == SubFormat::Q6_K || sub == SubFormat::Q3_K ? 2 : 1};
    } else {
        if (block_format(code)) return {static_cast<Format>(code) != Format::Q8_0, 1};
        bool offset = false;
        with_sub_format(*sub, [&](auto F) { offset = kOffset<decltype(F)::value>; });
        return {offset, sub == SubFormat::Q6_K ? 2 : 1};
    }
}

// acc + the products of codes w and activations x, summed per int32 lane: pairs of int16, or
// quads of unsigned weight bytes and signed activation bytes.
inline __m256i lane_sums(__m256i acc, __m256i w, __m256i x, int16_t) { return madd_add(acc, w, x); }
inline __m256i lane_sums(__m256i acc, __m256i w, __m256i x, int8_t) {
#if GENKIT_VNNI
    return _mm256_dpbusd_epi32(acc, w, x);
#else
    return _mm256_add_epi32(acc, byte_sums(w, x));  // unused: kHasBytePanels is false without VNNI
#endif
}

template <typename W>
inline __m256i broadcast_lane(const W* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// OR unpacked weight rows against panels p0 .. p0 + NP, into output columns o0 .. o0 + OR of the
// first `rows` activation rows. Per block of 32 inputs (or each half, Parts = 2), integer sums in
// registers, then sum * d * the row's scale into float accumulators, and m * the rows' input
// sums where the format has offsets. Not inlined, for the same reason as panel_tile.
template <typename Q, int OR, int NP, bool Offset, int Parts>
__attribute__((noinline)) void quant_panel_tile(const QuantPanels<Q>& x, int64_t p0, int64_t rows,
                                                const QuantTile<typename Codes16or8<Q>::W>& t, int64_t I, float* y,
                                                int64_t o0, int64_t O, bool add) {
    constexpr int kLane = Codes16or8<Q>::kPerLane, kSteps = kGroup / kLane / Parts;
    const int64_t blocks = I / kGroup, halves = 2 * blocks;
    __m256 acc[OR][NP];
    for (int o = 0; o < OR; ++o)
        for (int p = 0; p < NP; ++p) acc[o][p] = _mm256_setzero_ps();
    int64_t b = 0;
    do {  // blocks >= 1 (do/while: see panel_tile)
        for (int part = 0; part < Parts; ++part) {
            const int64_t first = b * kGroup + part * (kGroup / Parts);  // the first input summed
            __m256i sums[OR][NP];
            for (int o = 0; o < OR; ++o)
                for (int p = 0; p < NP; ++p) sums[o][p] = _mm256_setzero_si256();
#pragma GCC unroll 16
            for (int k = 0; k < kSteps; ++k) {
                __m256i xv[NP];
                for (int p = 0; p < NP; ++p)
                    xv[p] = _mm256_loadu_si256(
                        reinterpret_cast<const __m256i*>(x.q.data() + ((p0 + p) * I + first + kLane * k) * kPanel));
                for (int o = 0; o < OR; ++o) {
                    const __m256i wv = broadcast_lane(t.codes.data() + o * I + first + kLane * k);
                    for (int p = 0; p < NP; ++p) sums[o][p] = lane_sums(sums[o][p], wv, xv[p], Q{});
                }
            }
            __m256 xs[NP];
            for (int p = 0; p < NP; ++p) xs[p] = _mm256_loadu_ps(x.scale.data() + ((p0 + p) * blocks + b) * kPanel);
            const int64_t half = 2 * b + part;
            for (int o = 0; o < OR; ++o) {
                const __m256 dv = _mm256_set1_ps(t.d[o * halves + half]);
                for (int p = 0; p < NP; ++p)
                    acc[o][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[o][p]), _mm256_mul_ps(dv, xs[p]), acc[o][p]);
            }
            if constexpr (Offset) {  // per 16 inputs with Parts = 2, else m is the block's and the sums add up
                __m256 xm[NP];
                for (int p = 0; p < NP; ++p) {
                    const float* s = x.sum.data() + ((p0 + p) * halves + half) * kPanel;
                    xm[p] = Parts == 2 ? _mm256_loadu_ps(s) : _mm256_add_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + kPanel));
                }
                for (int o = 0; o < OR; ++o) {
                    const __m256 mv = _mm256_set1_ps(t.m[o * halves + half]);
                    for (int p = 0; p < NP; ++p) acc[o][p] = _mm256_fmadd_ps(mv, xm[p], acc[o][p]);
                }
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

template <typename Q, int OR, bool Offset, int Parts>
void quant_panel_tiles(const QuantPanels<Q>& x, int64_t M, const QuantTile<typename Codes16or8<Q>::W>& t, int64_t I,
                       float* y, int64_t o0, int64_t O, bool add) {
    panel_groups<kIntPanelsAtOnce>(M, [&](int64_t p, auto n) {
        quant_panel_tile<Q, OR, decltype(n)::value, Offset, Parts>(x, p, M, t, I, y, o0, O, add);
    });
}

// Output rows o_begin .. o_end of a weight in an integer format (its kernels' code) against every
// panel: a tile of rows is unpacked once (a few KB per row, from cache for every panel after the first).
template <typename Q>
void quant_panel_block(int64_t code, int64_t row_bytes, const QuantPanels<Q>& x, const uint8_t* w, float* y,
                       int64_t M, int64_t I, int64_t O, int64_t o_begin, int64_t o_end, bool add) {
    using W = typename Codes16or8<Q>::W;
    const int64_t halves = I / kHalf;
    const TileKind kind = tile_kind<Q>(code);
    QuantTile<W> t;
    t.codes.resize(kIntRowsO * I);
    t.d.resize(kIntRowsO * halves);
    t.m.resize(kIntRowsO * halves);
    for (int64_t o = o_begin; o < o_end; o += kIntRowsO) {
        const int64_t n = std::min<int64_t>(kIntRowsO, o_end - o);
        for (int64_t r = 0; r < n; ++r)
            unpack_row(code, w + (o + r) * row_bytes, I, t.codes.data() + r * I, t.d.data() + r * halves,
                       t.m.data() + r * halves);
        with_count<kIntRowsO>(n, [&](auto c) {
            constexpr int R = decltype(c)::value;
            if (kind.offset && kind.parts == 2) quant_panel_tiles<Q, R, true, 2>(x, M, t, I, y, o, O, add);
            else if (kind.offset) quant_panel_tiles<Q, R, true, 1>(x, M, t, I, y, o, O, add);
            else if (kind.parts == 2) quant_panel_tiles<Q, R, false, 2>(x, M, t, I, y, o, O, add);
            else quant_panel_tiles<Q, R, false, 1>(x, M, t, I, y, o, O, add);
        });
    }
}
}  // namespace
