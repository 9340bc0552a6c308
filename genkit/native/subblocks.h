// Integer products for the GGUF formats whose blocks split into 32-weight sub-blocks with small
// integer scales: Q5_0 and Q5_1 (a block is one sub-block) and the k-quants Q3_K, Q4_K, Q5_K and
// Q6_K (eight sub-blocks per 256-weight super-block). A sub-block is unpacked once into 32 codes
// as bytes plus its scales, then multiplied with up to four activation rows: quantised per 32 for
// Q5 (QuantizedRows, as quantized.h does for Q4_0 / Q4_1 / Q8_0), per 256 for the k-quants
// (SuperRows), whose sub-block products then sum as integers. Decoding rows to floats
// (blocks.h) took three times the instructions per weight, which a decode step cannot afford.
// Q2_K keeps the decoded path: its offsets change every 16 weights, finer than the activation
// sums kept per 32. Layouts: ggml's block structs (ggml-common.h), as blocks.h decodes them.
// Part of kernels.cpp's one translation unit, after quantized.h.
#pragma once

namespace {

enum class SubFormat { Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K };

// One sub-block: w_j = d * s_(j / 16) * c_j + m, for j in 0..31 (d: the whole block's scale).
struct Sub {
    __m256i codes;  // c_j as bytes: signed for Q3_K and Q6_K, else unsigned (< 32)
    __m256i pairs;  // the integer scales s of weights 0..15 (8 x int16, low 128 bits) and 16..31 (high):
                    // multipliers of the 16 maddubs pairs; equal but for Q3_K and Q6_K, 1 for Q5
    float d, m;
};

// Picks int16 a of each 128-bit half of `both` for the low half's eight lanes and int16 b for the
// high half's: a sub-block's pair multipliers from a super-block's scales, one shuffle.
inline __m256i pick_pairs(__m256i both, int a, int b) {
    return _mm256_shuffle_epi8(both, _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * b)),
                                                      _mm_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * a))));
}

// Eight int16 scales (as bytes at p, or as int16) in both 128-bit halves, for pick_pairs.
inline __m256i both_halves_u8(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256i both_halves_i8(const int8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <SubFormat F>
constexpr int kSubs = F == SubFormat::Q5_0 || F == SubFormat::Q5_1 ? 1 : 8;
template <SubFormat F>
constexpr int64_t kSubBytes = F == SubFormat::Q5_0 ? 22 : F == SubFormat::Q5_1 ? 24 : F == SubFormat::Q3_K ? 110
                            : F == SubFormat::Q4_K ? 144 : F == SubFormat::Q5_K ? 176 : 210;
template <SubFormat F>
constexpr bool kSignedCodes = F == SubFormat::Q3_K || F == SubFormat::Q6_K;
template <SubFormat F>
constexpr bool kSuper = kSubs<F> == 8;  // the k-quants

template <SubFormat F>
constexpr bool kOffset = !kSignedCodes<F>;

// Byte j of the result is 0x10 where bit j of `bits` is set: the fifth bit of Q5 codes.
inline __m256i fifth_bits(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Q5_0 (f16 d, 4 bytes of fifth bits, 16 bytes of nibbles): w = d q - 16 d.
// Q5_1 (f16 d, f16 m, the same):                         w = d q + m.
template <bool Offset, typename Fn>
inline void unpack_q5(const uint8_t* b, Fn&& use) {
    const float d = half_to_float(b);
    const uint8_t* at = b + (Offset ? 4 : 2);
    uint32_t qh;
    std::memcpy(&qh, at, 4);
    use(0, Sub{_mm256_or_si256(q4_bytes(at + 4), fifth_bits(qh)), _mm256_set1_epi16(1), d,
               Offset ? half_to_float(b + 2) : -16.0f * d});
}

// The eight 6-bit scales and eight 6-bit mins of Q4_K / Q5_K, packed in 12 bytes (blocks.h's
// scale_min_k4 one at a time), all at once: as 32-bit words w0 w1 w2, the first four scales are
// the low 6 bits of w0's bytes and the first four mins those of w1's; the last four take their low
// 4 bits from w2's nibbles (scales low, mins high) and their top 2 from the top bits of w0 / w1.
inline void scales_mins_k4(const uint8_t* packed, uint8_t* scales, uint8_t* mins) {
    uint32_t w[3];
    std::memcpy(w, packed, 12);
    const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
    const uint32_t sc[2] = {w[0] & six, (w[2] & four) | (((w[0] >> 6) & two) << 4)};
    const uint32_t mn[2] = {w[1] & six, ((w[2] >> 4) & four) | (((w[1] >> 6) & two) << 4)};
    std::memcpy(scales, sc, 8);
    std::memcpy(mins, mn, 8);
}

// Q4_K / Q5_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, (Q5_K) 32 bytes of fifth
// bits, 128 bytes of nibbles; each 32 nibble bytes hold two sub-blocks, low nibbles first.
// w = d sc q - dmin mn.
template <bool Fifth, typename Fn>
inline void unpack_q45_k(const uint8_t* b, Fn&& use) {
    uint8_t scales[8], mins[8];
    scales_mins_k4(b + 4, scales, mins);
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *qh = b + 16, *q = b + (Fifth ? 48 : 16);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i high = Fifth ? load32(qh) : _mm256_setzero_si256(), all = both_halves_u8(scales);
    for (int j = 0; j < 8; ++j) {
        const __m256i packed = load32(q + 32 * (j / 2));
        __m256i codes = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(packed, 4) : packed, mask);
        if (Fifth) {  // bit j of each high byte, moved to bit 4
            const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
            codes = _mm256_or_si256(codes, _mm256_slli_epi16(bit, 4));
        }
        use(j, Sub{codes, pick_pairs(all, j, j), d, -dmin * mins[j]});
    }
}

// Q6_K: 128 bytes of nibbles, 64 bytes of 2-bit highs, 16 int8 scales (per 16 weights), f16 d.
// w = d s (q - 32). Each half of the super-block: nibble bytes lo (0..31) and hi (32..63), high
// bytes h; sub-block k takes lo / hi / lo >> 4 / hi >> 4 and bits 2k..2k+1 of h.
template <typename Fn>
inline void unpack_q6_k(const uint8_t* b, Fn&& use) {
    const float d = half_to_float(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const __m256i mask = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    for (int n = 0; n < 2; ++n) {
        const __m256i lo = load32(b + 64 * n), hi = load32(b + 64 * n + 32), h = load32(b + 128 + 32 * n);
        const __m256i all = both_halves_i8(sc + 8 * n);
        const __m256i q[4] = {_mm256_and_si256(lo, mask), _mm256_and_si256(hi, mask),
                              _mm256_and_si256(_mm256_srli_epi16(lo, 4), mask),
                              _mm256_and_si256(_mm256_srli_epi16(hi, 4), mask)};
        for (int k = 0; k < 4; ++k) {
            const __m256i top = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * k)), two);
            const __m256i codes = _mm256_sub_epi8(_mm256_or_si256(q[k], _mm256_slli_epi16(top, 4)), bias);
            use(4 * n + k, Sub{codes, pick_pairs(all, 2 * k, 2 * k + 1), d, 0.0f});
        }
    }
}

// Q3_K: 32 bytes of high bits, 64 bytes of 2-bit codes, 12 bytes of sixteen 6-bit scales, f16 d.
// w = d (s - 32) (q - (high bit ? 0 : 4)); sub-block j (of 8) takes bits 2 (j % 4) .. of code
// bytes 32 (j / 4) .. and bit j of the high bytes.
template <typename Fn>
inline void unpack_q3_k(const uint8_t* b, Fn&& use) {
    const uint8_t *hm = b, *q = b + 32;
    const float d = half_to_float(b + 108);
    alignas(16) int16_t scales[16];
    blocks::q3_k_scales(b + 96, scales);
    const __m256i highs = load32(hm), three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    const __m256i all[2] = {_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales))),
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 8)))};
    for (int j = 0; j < 8; ++j) {
        const __m256i two_bits = _mm256_and_si256(_mm256_srl_epi16(load32(q + 32 * (j / 4)), _mm_cvtsi32_si128(2 * (j % 4))), three);
        const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(highs, _mm_cvtsi32_si128(j)), one);
        // q - 4 + 4 * bit
        const __m256i codes = _mm256_add_epi8(_mm256_sub_epi8(two_bits, _mm256_set1_epi8(4)), _mm256_slli_epi16(bit, 2));
        use(j, Sub{codes, pick_pairs(all[j / 4], 2 * (j % 4), 2 * (j % 4) + 1), d, 0.0f});
    }
}

// Calls use(j, sub) for each sub-block j of the block at b, in weight order.
template <SubFormat F, typename Fn>
inline void unpack(const uint8_t* b, Fn&& use) {
    if constexpr (F == SubFormat::Q5_0) unpack_q5<false>(b, use);
    else if constexpr (F == SubFormat::Q5_1) unpack_q5<true>(b, use);
    else if constexpr (F == SubFormat::Q3_K) unpack_q3_k(b, use);
    else if constexpr (F == SubFormat::Q4_K) unpack_q45_k<false>(b, use);
    else if constexpr (F == SubFormat::Q5_K) unpack_q45_k<true>(b, use);
    else unpack_q6_k(b, use);
}

// A sub-block's codes ready for one activation type's products, then sum_j s c_j x_j as eight
// int32 partial sums turned float.
template <typename Q, SubFormat F>
struct SubDot;

// int16 activations (Q5_0 / Q5_1; the k-quants take SuperRows): codes widened to int16.
template <SubFormat F>
struct SubDot<int16_t, F> {
    static_assert(!kSuper<F>, "k-quants multiply SuperRows (super_row)");
    __m256i first, second;  // weights 0..15 and 16..31
    explicit SubDot(const Sub& s)
        : first(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(s.codes))),
          second(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(s.codes, 1))) {}
    __m256 operator()(const int16_t* x) const { return block_dot(Codes{first, second}, x); }
};

// int8 activations: maddubs wants unsigned codes, so signed ones lend their sign to x; the
// sub-block's scales weight the pairs in the madd that sums them (pairs 0..7 hold weights 0..15).
template <SubFormat F>
struct SubDot<int8_t, F> {
    __m256i codes, signs, scales;
    explicit SubDot(const Sub& s)
        : codes(kSignedCodes<F> ? _mm256_sign_epi8(s.codes, s.codes) : s.codes),
          signs(s.codes),
          scales(s.pairs) {}
    // acc + sum_j s c_j x_j, as eight int32 partial sums
    __m256i pair_sums(__m256i acc, const int8_t* x) const {
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        if constexpr (kSignedCodes<F>) xv = _mm256_sign_epi8(xv, signs);
        return madd_add(acc, _mm256_maddubs_epi16(codes, xv), scales);
    }
    __m256 operator()(const int8_t* x) const { return _mm256_cvtepi32_ps(pair_sums(_mm256_setzero_si256(), x)); }
};

// One output row against R activation rows, as gguf_row: every sub-block unpacked once and used
// R times, two accumulators per row (even and odd sub-blocks), offsets summed apart.
// Q5_0 / Q5_1 (one 32-weight block per sub-block) against activations quantised per 32.
template <SubFormat F, typename Q, int R>
inline void sub_row(const QuantizedRows<Q>& xq, int64_t m0, const uint8_t* row, int64_t blocks, float* y, int64_t O,
                    bool add) {
    constexpr int S = kSubs<F>;
    __m256 acc[2][R];
    float offset[2][R];  // two chains of adds, as two accumulators
    for (int r = 0; r < R; ++r) {
        acc[0][r] = acc[1][r] = _mm256_setzero_ps();
        offset[0][r] = offset[1][r] = 0.0f;
    }
    for (int64_t b0 = 0; b0 < blocks; b0 += S) {
        unpack<F>(row + b0 / S * kSubBytes<F>, [&](int j, const Sub& s) {
            const SubDot<Q, F> prepared(s);
            const float factor = s.d;  // Q5 sub-blocks have no integer scale
            const int64_t b = b0 + j;
            for (int r = 0; r < R; ++r) {
                const int64_t xb = (m0 + r) * blocks + b;
                const __m256 dot = prepared(xq.q.data() + xb * kGroup);
                acc[b & 1][r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(factor * xq.scale[xb]), acc[b & 1][r]);
                if constexpr (kOffset<F>) offset[b & 1][r] += s.m * xq.sum[xb];
            }
        });
    }
    store_rows<R>(acc, offset, y, O, m0, add);
}

template <SubFormat F, typename Q>
void sub_rows(const QuantizedRows<Q>& xq, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O,
              int64_t o_begin, int64_t o_end, bool add) {
    const int64_t blocks = I / kGroup, row_bytes = blocks / kSubs<F> * kSubBytes<F>;
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint8_t* row = w + o * row_bytes;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) sub_row<F, Q, 4>(xq, m0, row, blocks, y + o, O, add);
        with_count<3>(M - m0, [&](auto r) { sub_row<F, Q, decltype(r)::value>(xq, m0, row, blocks, y + o, O, add); });
    }
}

// Activations for the k-quants quantised per 256 inputs (one scale per super-block), so that the
// eight sub-block products of a super-block sum as integers and turn float once, not once per 32
// weights. Bytes (wide = false) are llama.cpp's Q8_K. Wide rows keep 16 bits, v = 256 hi + lo with
// hi signed and lo unsigned, as two byte planes: a product is then two maddubs, one per plane, at
// a third of the cost of widening the codes to int16 (measured on Q4_K rows).
struct SuperRows {
    std::vector<int8_t> q;  // bytes, or the high bytes of wide rows
    std::vector<uint8_t> low;  // wide rows: the low bytes
    std::vector<float> scale;  // per 256 inputs
    std::vector<float> sum;  // per 32 inputs: scale * the codes' sum, for the Q4_K / Q5_K offsets
};

constexpr int64_t kSuperGroup = 256;
// Wide codes stop at +-127 * 256, so that a high byte is never -128, which the sign trick for
// signed weight codes could not negate.
constexpr float kWideMax = 127.0f * 256.0f;

// r = x's M rows quantised per 256 (r's buffers keep their capacity from call to call).
void quantize_super(const float* x, int64_t M, int64_t I, bool wide, SuperRows& r) {
    const int64_t supers = I / kSuperGroup;
    r.q.resize(M * I);
    r.low.resize(wide ? M * I : 0);
    r.scale.resize(M * supers);
    r.sum.resize(M * I / kGroup);
    const float top = wide ? kWideMax : 127.0f;
    const int limit = static_cast<int>(top);
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            for (int64_t b = 0; b < supers; ++b) {
                const int64_t at = m * I + b * kSuperGroup;
                float amax = 0.0f;
                for (int j = 0; j < kSuperGroup; ++j) amax = std::max(amax, std::fabs(x[at + j]));
                const float scale = amax / top, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
                r.scale[m * supers + b] = scale;
                for (int g = 0; g < kSuperGroup / kGroup; ++g) {
                    int qsum = 0;
                    for (int j = g * kGroup; j < (g + 1) * kGroup; ++j) {
                        const int v = std::clamp(static_cast<int>(std::nearbyint(x[at + j] * inv)), -limit, limit);
                        qsum += v;
                        if (wide) {
                            r.q[at + j] = static_cast<int8_t>(v >> 8);  // floor(v / 256)
                            r.low[at + j] = static_cast<uint8_t>(v & 0xFF);
                        } else {
                            r.q[at + j] = static_cast<int8_t>(v);
                        }
                    }
                    r.sum[(at + g * kGroup) / kGroup] = scale * static_cast<float>(qsum);
                }
            }
        }
    });
}

template <SubFormat F, int R, bool Wide>
inline void super_row(const SuperRows& xq, int64_t m0, const uint8_t* row, int64_t supers, float* y, int64_t O,
                      bool add) {
    // offsets: the eight sub-blocks' m times their activation sums, a vector fma per super-block
    // (a scalar sum per sub-block is a chain of dependent adds, slower than the products)
    __m256 acc[R], offset[R];
    for (int r = 0; r < R; ++r) acc[r] = offset[r] = _mm256_setzero_ps();
    const int64_t I = supers * kSuperGroup;
    for (int64_t sb = 0; sb < supers; ++sb) {
        // |sums| <= 8 sub-blocks * 2 * (2 * 32 * 255) * 128 < 2^26: exact as int32
        __m256i high[R], low[R];
        for (int r = 0; r < R; ++r) high[r] = low[r] = _mm256_setzero_si256();
        float d = 0.0f;
        alignas(32) float ms[8];
        unpack<F>(row + sb * kSubBytes<F>, [&](int j, const Sub& s) {
            const SubDot<int8_t, F> prepared(s);
            d = s.d;
            ms[j] = s.m;
            for (int r = 0; r < R; ++r) {
                const int64_t at = (m0 + r) * I + sb * kSuperGroup + j * kGroup;
                high[r] = prepared.pair_sums(high[r], xq.q.data() + at);
                if constexpr (Wide) {  // the unsigned plane goes first in maddubs, the codes as signed bytes
                    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.low.data() + at));
                    low[r] = madd_add(low[r], _mm256_maddubs_epi16(lo, s.codes), s.pairs);
                }
            }
        });
        for (int r = 0; r < R; ++r) {
            const int64_t at = (m0 + r) * supers + sb;
            __m256 sum = _mm256_cvtepi32_ps(high[r]);
            if constexpr (Wide) sum = _mm256_fmadd_ps(sum, _mm256_set1_ps(256.0f), _mm256_cvtepi32_ps(low[r]));
            acc[r] = _mm256_fmadd_ps(sum, _mm256_set1_ps(d * xq.scale[at]), acc[r]);
            if constexpr (kOffset<F>) offset[r] = _mm256_fmadd_ps(_mm256_load_ps(ms), _mm256_loadu_ps(&xq.sum[at * 8]), offset[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        const float v = hsum(_mm256_add_ps(acc[r], offset[r]));
        float& out = y[(m0 + r) * O];
        out = add ? out + v : v;
    }
}

template <SubFormat F, bool Wide>
void super_rows(const SuperRows& xq, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O, int64_t o_begin,
                int64_t o_end, bool add) {
    const int64_t supers = I / kSuperGroup, row_bytes = supers * kSubBytes<F>;
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint8_t* row = w + o * row_bytes;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) super_row<F, 4, Wide>(xq, m0, row, supers, y + o, O, add);
        with_count<3>(M - m0, [&](auto r) { super_row<F, decltype(r)::value, Wide>(xq, m0, row, supers, y + o, O, add); });
    }
}

// The sub-block format of a kernels' code (formats.def), if it has one.
inline std::optional<SubFormat> sub_format(int64_t code) {
    switch (code) {
        case 6: return SubFormat::Q5_0;
        case 7: return SubFormat::Q5_1;
        case 11: return SubFormat::Q3_K;
        case 12: return SubFormat::Q4_K;
        case 13: return SubFormat::Q5_K;
        case 14: return SubFormat::Q6_K;
        default: return std::nullopt;
    }
}

template <typename Fn>
inline void with_sub_format(SubFormat f, Fn&& fn) {
    switch (f) {
        case SubFormat::Q5_0: fn(std::integral_constant<SubFormat, SubFormat::Q5_0>{}); break;
        case SubFormat::Q5_1: fn(std::integral_constant<SubFormat, SubFormat::Q5_1>{}); break;
        case SubFormat::Q3_K: fn(std::integral_constant<SubFormat, SubFormat::Q3_K>{}); break;
        case SubFormat::Q4_K: fn(std::integral_constant<SubFormat, SubFormat::Q4_K>{}); break;
        case SubFormat::Q5_K: fn(std::integral_constant<SubFormat, SubFormat::Q5_K>{}); break;
        default: fn(std::integral_constant<SubFormat, SubFormat::Q6_K>{}); break;
    }
}

}  // namespace
