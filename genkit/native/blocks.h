// Row decoders for the GGUF block formats that kernels.cpp multiplies by decoding each weight
// row to floats (into a buffer that stays in L1/L2) and then running the float product on it:
// F16, Q5_0, Q5_1 and the k-quants Q2_K .. Q6_K. The layouts are ggml's (block structs in
// ggml-common.h); the tests compare every decoder with gguf.quants' numpy dequantisation.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace blocks {

inline float half(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// Eight codes (bytes at p, unsigned or signed) as floats times d plus m.
inline void store8(const uint8_t* p, bool is_signed, __m256 d, __m256 m, float* y) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m256i wide = is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
    _mm256_storeu_ps(y, _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), d, m));
}

// Q5_0 (22 bytes): f16 d, 32 high bits, 16 bytes of low nibbles;  w = (q - 16) d.
// Q5_1 (24 bytes): f16 d, f16 m, 32 high bits, 16 bytes of nibbles; w = q d + m.
// Byte j holds weights j (low nibble) and j + 16 (high); bit j of the high bits is weight j's.
template <bool Offset>
inline void q5(const uint8_t* b, float* y) {
    const float d = half(b), m = Offset ? half(b + 2) : -16.0f * d;
    const uint8_t* at = b + (Offset ? 4 : 2);
    uint32_t qh;
    std::memcpy(&qh, at, 4);
    const uint8_t* qs = at + 4;
    // the 32 codes as bytes: low nibbles (weights 0..15), high nibbles (16..31), plus bit j of qh
    alignas(32) uint8_t codes[32];
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    _mm_store_si128(reinterpret_cast<__m128i*>(codes), _mm_and_si128(packed, mask));
    _mm_store_si128(reinterpret_cast<__m128i*>(codes + 16), _mm_and_si128(_mm_srli_epi16(packed, 4), mask));
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    const __m256i bits = _mm256_set1_epi32(static_cast<int>(qh)), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j = 0; j < 32; j += 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j));
        const __m256i high = _mm256_and_si256(_mm256_srlv_epi32(bits, _mm256_add_epi32(lanes, _mm256_set1_epi32(j))),
                                              _mm256_set1_epi32(1));
        const __m256i code = _mm256_or_si256(_mm256_cvtepu8_epi32(bytes), _mm256_slli_epi32(high, 4));
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(code), dv, mv));
    }
}

// Q2_K (84 bytes, 256 weights): 16 bytes of 4-bit scale / 4-bit min pairs, 64 bytes of 2-bit
// codes, f16 d, f16 dmin. Each 32 code bytes hold 128 weights: bits 2s..2s+1 of byte l are
// weight 32 s + l; a scale covers 16 weights.  w = d sc q - dmin mn.
inline void q2_k(const uint8_t* b, float* y) {
    const uint8_t *sc = b, *q = b + 16;
    const float d = half(b + 80), dmin = half(b + 82);
    int is = 0;
    for (int n = 0; n < 256; n += 128, q += 32)
        for (int shift = 0; shift < 8; shift += 2)
            for (int part = 0; part < 2; ++part, ++is) {
                const float dl = d * (sc[is] & 0x0F), ml = dmin * (sc[is] >> 4);
                for (int l = 0; l < 16; ++l) *y++ = dl * ((q[l + 16 * part] >> shift) & 3) - ml;
            }
}

// Q3_K (110 bytes, 256 weights): 32 bytes of high bits, 64 bytes of 2-bit codes (as Q2_K),
// 12 bytes of sixteen 6-bit scales, f16 d.  w = d (sc - 32) (q - (high bit ? 0 : 4)).
// Q3_K's sixteen 6-bit scales (12 bytes), each minus 32: low 4 bits from the first 8 bytes'
// nibbles, top 2 bits from the last 4 bytes' bit pairs.
inline void q3_k_scales(const uint8_t* packed, int16_t* scales) {
    for (int i = 0; i < 16; ++i) {
        const int low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
        const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        scales[i] = static_cast<int16_t>((low | (high << 4)) - 32);
    }
}

inline void q3_k(const uint8_t* b, float* y) {
    const uint8_t *hm = b, *q = b + 32;
    const float d = half(b + 108);
    int16_t scales[16];
    q3_k_scales(b + 96, scales);
    int is = 0, bit = 0;
    for (int n = 0; n < 256; n += 128, q += 32)
        for (int shift = 0; shift < 8; shift += 2, ++bit)
            for (int part = 0; part < 2; ++part, ++is) {
                const float dl = d * scales[is];
                for (int l = 0; l < 16; ++l) {
                    const int i = l + 16 * part;
                    *y++ = dl * (((q[i] >> shift) & 3) - ((hm[i] >> bit) & 1 ? 0 : 4));
                }
            }
}

// The eight 6-bit scales and mins of Q4_K / Q5_K, packed in 12 bytes.
inline void scale_min_k4(const uint8_t* s, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K (144 bytes) and Q5_K (176 bytes), 256 weights: f16 d, f16 dmin, 12 bytes of scales, for
// Q5_K 32 bytes of high bits, then 128 bytes of nibbles: each 32 bytes hold 64 weights (low
// nibbles first). w = d sc q - dmin mn, per 32 weights.
template <bool High>
inline void q45_k(const uint8_t* b, float* y) {
    const float d = half(b), dmin = half(b + 2);
    const uint8_t *s = b + 4, *qh = b + 16, *q = b + (High ? 48 : 16);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j, q += 32) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        __m256i halves[2] = {_mm256_and_si256(packed, mask), _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask)};
        if (High) {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
            for (int part = 0; part < 2; ++part) {
                // bit 2j + part of each high byte, moved to bit 4
                const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * j + part)), _mm256_set1_epi8(1));
                halves[part] = _mm256_or_si256(halves[part], _mm256_slli_epi16(bit, 4));
            }
        }
        for (int part = 0; part < 2; ++part) {
            int sc, mn;
            scale_min_k4(s, 2 * j + part, sc, mn);
            alignas(32) uint8_t codes[32];
            _mm256_store_si256(reinterpret_cast<__m256i*>(codes), halves[part]);
            const __m256 dv = _mm256_set1_ps(d * sc), mv = _mm256_set1_ps(-dmin * mn);
            for (int l = 0; l < 32; l += 8) store8(codes + l, false, dv, mv, y + l);
            y += 32;
        }
    }
}

// Q6_K (210 bytes, 256 weights): 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales
// (one per 16 weights), f16 d.  w = d sc (q - 32).
inline void q6_k(const uint8_t* b, float* y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half(b + 208);
    const __m256i mask = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    const __m256 zero = _mm256_setzero_ps();
    for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8, y += 128) {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
        // the four 32-weight rows of this half: nibble | two high bits << 4, minus 32
        const __m256i q[4] = {
            _mm256_and_si256(lo, mask), _mm256_and_si256(hi, mask),
            _mm256_and_si256(_mm256_srli_epi16(lo, 4), mask), _mm256_and_si256(_mm256_srli_epi16(hi, 4), mask)};
        for (int k = 0; k < 4; ++k) {
            const __m256i high = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * k)), two);
            const __m256i code = _mm256_sub_epi8(_mm256_or_si256(q[k], _mm256_slli_epi16(high, 4)), bias);
            alignas(32) int8_t codes[32];
            _mm256_store_si256(reinterpret_cast<__m256i*>(codes), code);
            for (int l = 0; l < 32; l += 8)
                store8(reinterpret_cast<const uint8_t*>(codes + l), true, _mm256_set1_ps(d * sc[l / 16 + 2 * k]), zero,
                       y + 32 * k + l);
        }
    }
}

// The formats decoded here, by the kernels' code (formats.def).
constexpr int64_t kF16 = 5, kQ5_0 = 6, kQ5_1 = 7, kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;

constexpr int64_t weights_per_block(int64_t code) { return code == kF16 ? 1 : code >= kQ2_K ? 256 : 32; }

// One row of I weights (I a multiple of the block's weight count) decoded to floats.
template <int64_t Code>
inline void decode_row(const uint8_t* row, int64_t I, float* out) {
    if constexpr (Code == kF16) {
        int64_t i = 0;
        for (; i + 8 <= I; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i))));
        for (; i < I; ++i) out[i] = half(row + 2 * i);
    } else {
        constexpr int64_t n = weights_per_block(Code);
        constexpr int64_t bytes = Code == kQ5_0 ? 22 : Code == kQ5_1 ? 24 : Code == kQ2_K ? 84 : Code == kQ3_K ? 110
                                : Code == kQ4_K ? 144 : Code == kQ5_K ? 176 : 210;
        for (int64_t b = 0; b < I / n; ++b, row += bytes, out += n) {
            if constexpr (Code == kQ5_0) q5<false>(row, out);
            else if constexpr (Code == kQ5_1) q5<true>(row, out);
            else if constexpr (Code == kQ2_K) q2_k(row, out);
            else if constexpr (Code == kQ3_K) q3_k(row, out);
            else if constexpr (Code == kQ4_K) q45_k<false>(row, out);
            else if constexpr (Code == kQ5_K) q45_k<true>(row, out);
            else q6_k(row, out);
        }
    }
}

constexpr bool decoded(int64_t code) { return code == kF16 || code == kQ5_0 || code == kQ5_1 || (code >= kQ2_K && code <= kQ6_K); }

// Calls fn(std::integral_constant<int64_t, Code>{}) for the decoded format `code`.
template <typename Fn>
inline void with_decoded(int64_t code, Fn&& fn) {
    switch (code) {
        case kF16: fn(std::integral_constant<int64_t, kF16>{}); break;
        case kQ5_0: fn(std::integral_constant<int64_t, kQ5_0>{}); break;
        case kQ5_1: fn(std::integral_constant<int64_t, kQ5_1>{}); break;
        case kQ2_K: fn(std::integral_constant<int64_t, kQ2_K>{}); break;
        case kQ3_K: fn(std::integral_constant<int64_t, kQ3_K>{}); break;
        case kQ4_K: fn(std::integral_constant<int64_t, kQ4_K>{}); break;
        case kQ5_K: fn(std::integral_constant<int64_t, kQ5_K>{}); break;
        default: fn(std::integral_constant<int64_t, kQ6_K>{}); break;
    }
}

}  // namespace blocks
