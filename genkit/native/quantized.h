// Products of float activations with GGUF Q4_0 / Q4_1 / Q8_0 blocks as they are: the
// activations quantised per block of 32 (int16, or int8 as llama.cpp does), integer dot products.
// Part of kernels.cpp's one translation unit, which includes torch, AVX2 and blocks.h first and
// then, in this order: quantized.h, subblocks.h, dense.h, int_panels.h, weights.h, attention.h.
#pragma once

namespace {

constexpr int64_t kGroup = 32;
constexpr int kRowsAtOnce = 4;  // activation rows sharing one read of a weight block

// Calls f(std::integral_constant<int, k>{}) for the k in 1..N equal to n: a run-time count (the
// rows or lanes left over) turned into the compile-time one that register tiles need. n = 0: nothing.
template <int N, typename F>
inline void with_count(int64_t n, F&& f) {
    if constexpr (N > 0) {
        if (n == N) f(std::integral_constant<int, N>{});
        else with_count<N - 1>(n, f);
    }
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

inline float half_to_float(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// A block's 32 weight codes as two vectors of 16 int16, in weight order.
struct Codes {
    __m256i first, second;  // weights 0..15 and 16..31
};

// Q4: byte j holds weight j in its low nibble and weight j + 16 in its high one.
inline Codes q4_codes(const uint8_t* qs) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return {_mm256_cvtepu8_epi16(_mm_and_si128(packed, mask)),
            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask))};
}

inline Codes q8_codes(const uint8_t* qs) {
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16)))};
}

// Where the build has AVX-512 VNNI (kernels.py adds the flags on CPUs that have it), a multiply
// of integer pairs or quads and its sum are one instruction, not two or three: the same integers
// either way, on 256-bit vectors as everywhere else.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define GENKIT_VNNI 1
#else
#define GENKIT_VNNI 0
#endif

// acc + the int16 products of a and b summed in pairs into eight int32.
inline __m256i madd_add(__m256i acc, __m256i a, __m256i b) {
#if GENKIT_VNNI
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// The products of unsigned bytes a and signed bytes b summed in fours into eight int32 (no
// saturation where, as here, a pair's sum fits int16: at most 2 * 127 * 127).
inline __m256i byte_sums(__m256i a, __m256i b) {
#if GENKIT_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

// sum_j code_j * x_j over one block, as eight int32 partial sums turned float. No overflow:
// |code| <= 127 and |x| <= 32767, 32 products.
inline __m256 block_dot(const Codes& c, const int16_t* x) {
    const __m256i lo = _mm256_madd_epi16(c.first, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    return _mm256_cvtepi32_ps(madd_add(lo, c.second, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
}

enum class Format { Q4_0, Q4_1, Q8_0 };

constexpr int64_t block_bytes(Format f) { return f == Format::Q4_1 ? 20 : f == Format::Q4_0 ? 18 : 34; }

// A block is an fp16 scale d, for Q4_1 an fp16 offset m, then the codes. Where they start:
template <Format F>
constexpr int64_t kCodesAt = F == Format::Q4_1 ? 4 : 2;

// The term a block adds to each weight besides q d: w = q d + m (Q4_1), q d - 8 d (Q4_0), q d (Q8_0).
template <Format F>
inline float block_offset(const uint8_t* blk, float d) {
    if constexpr (F == Format::Q4_1) return half_to_float(blk + 2);
    else if constexpr (F == Format::Q4_0) return -8.0f * d;
    else return 0.0f;
}

template <Format F>
inline Codes block_codes(const uint8_t* blk) {
    if constexpr (F == Format::Q8_0) return q8_codes(blk + kCodesAt<F>);
    else return q4_codes(blk + kCodesAt<F>);
}

// Calls f(std::integral_constant<Format, F>{}) for the F equal to f: a weight's run-time kind
// turned into the compile-time format the block loops are written for.
template <typename Fn>
inline void with_format(Format f, Fn&& fn) {
    if (f == Format::Q4_1) fn(std::integral_constant<Format, Format::Q4_1>{});
    else if (f == Format::Q4_0) fn(std::integral_constant<Format, Format::Q4_0>{});
    else fn(std::integral_constant<Format, Format::Q8_0>{});
}

// Activations for the integer products: each block of 32 inputs as integers Q times one float
// scale, plus the block's sum for the offset terms of the Q4 formats (w = q d + m adds m * sum(x)
// per block). That sum is taken over the quantised inputs, not the exact ones: code and offset
// terms then see the same x and their large parts cancel.
//   Q = int16_t: scale amax / 32767, about 1e-5 of relative precision; greedy output stays fp32's.
//   Q = int8_t:  scale amax / 127, as llama.cpp quantises them: a block's dot product is one
//                maddubs and one madd, about half the instructions, for about 4e-3 relative error
//                in each product (greedy output can drift from fp32's).
template <typename Q>
struct QuantizedRows {
    std::vector<Q> q;
    std::vector<float> scale, sum;
};

// e^x for eight floats, to about 2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r from a degree-6
// polynomial, 2^n put straight into the exponent bits. (std::exp is scalar: the MLP's silu over
// 1536 values per row and layer cost more than the product it feeds at 32 rows.)
inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n ln2, with ln2 split in two so that n * (high part) is exact
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// silu(gate) * up over n values.
void glu_row(const float* gate, const float* up, float* out, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// 1 / sqrt(mean(v^2) + eps) over n values, the mean of squares in double as torch's rms_norm
// computes it: the factor of every RMS norm in the kernels (before a product, of q/k heads, of a
// layer's output).
inline float inv_rms(const float* v, int64_t n, float eps) {
    double squares = 0.0;
    for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(v[i]) * v[i];
    return 1.0f / std::sqrt(static_cast<float>(squares / n) + eps);
}

// gelu(gate) * up over n values, gelu's tanh approximation as torch computes it:
// 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), with tanh(z) = 1 - 2 / (e^(2z) + 1).
void gelu_glu_row(const float* gate, const float* up, float* out, int64_t n) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f, kCube = 0.044715f;
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi),
                                           _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kCube), g), _mm256_mul_ps(g, g), g));
        const __m256 tanh = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_mul_ps(two, inner)), one)));
        const __m256 gelu = _mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, tanh));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; ++i) {
        const float g = gate[i];
        out[i] = 0.5f * g * (1.0f + std::tanh(kSqrt2OverPi * (g + kCube * g * g * g))) * up[i];
    }
}

// The rows a product actually multiplies, computed from x in one pass: with `glu`, x holds
// 2I columns and the input is silu(x[:, :I]) * x[:, I:] (the MLP's gate and up halves); with
// `norm`, an RMS norm with that weight. Each would otherwise be a few separate torch calls per
// layer, costing more than their arithmetic. Returns x itself when there is nothing to do.
const float* prepare_rows(const float* x, int64_t M, int64_t I, const float* norm, float eps, bool glu,
                          std::vector<float>& buffer) {
    if (!norm && !glu) return x;
    buffer.resize(M * I);
    float* rows = buffer.data();
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            float* out = rows + m * I;
            if (glu) {
                glu_row(x + m * 2 * I, x + m * 2 * I + I, out, I);
            } else {
                std::copy(x + m * I, x + (m + 1) * I, out);
            }
            if (norm) {
                const float factor = inv_rms(out, I, eps);
                for (int64_t i = 0; i < I; ++i) out[i] = out[i] * factor * norm[i];
            }
        }
    });
    return rows;
}

// One block of 32 inputs v as codes q = round(v / scale) of type Q, the scale putting the block's
// largest magnitude at Q's largest value; returns the scale.
template <typename Q>
inline float quantize_block(const float* v, Q* q) {
    constexpr int kMax = std::numeric_limits<Q>::max();
    float amax = 0.0f;
    for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float scale = amax / kMax, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int j = 0; j < kGroup; ++j)
        q[j] = static_cast<Q>(std::clamp(static_cast<int>(std::nearbyint(v[j] * inv)), -kMax, kMax));
    return scale;
}

// r = x's M rows quantised per block of 32 (r's buffers keep their capacity from call to call).
template <typename Q>
void quantize_rows(const float* x, int64_t M, int64_t I, QuantizedRows<Q>& r) {
    const int64_t blocks = I / kGroup;
    r.q.resize(M * I);
    r.scale.resize(M * blocks);
    r.sum.resize(M * blocks);
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            for (int64_t b = 0; b < blocks; ++b) {
                Q* q = r.q.data() + (m * blocks + b) * kGroup;
                const float scale = quantize_block(x + m * I + b * kGroup, q);
                int qsum = 0;
                for (int j = 0; j < kGroup; ++j) qsum += q[j];
                r.scale[m * blocks + b] = scale;
                r.sum[m * blocks + b] = scale * static_cast<float>(qsum);
            }
        }
    });
}

// A Q4 block's 32 codes as unsigned bytes in weight order (low nibbles, then high ones).
inline __m256i q4_bytes(const uint8_t* qs) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// sum_j code_j * x_j as eight int32 partial sums turned float; codes unsigned (< 16) or, for
// Q8_0, signed (their sign moved onto x, since maddubs wants its first operand unsigned).
template <bool Signed>
inline __m256 block_dot8(__m256i codes, const int8_t* x) {
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    if constexpr (Signed) {
        xv = _mm256_sign_epi8(xv, codes);
        codes = _mm256_sign_epi8(codes, codes);
    }
    return _mm256_cvtepi32_ps(byte_sums(codes, xv));
}

// A block's dot product with quantised activations of type Q: how its codes are loaded, and
// sum_j code_j * x_j over the block.
template <typename Q>
struct Dot;

template <>
struct Dot<int16_t> {
    template <Format F>
    static Codes codes(const uint8_t* blk) { return block_codes<F>(blk); }
    template <Format F>
    static __m256 dot(const Codes& c, const int16_t* x) { return block_dot(c, x); }
};

template <>
struct Dot<int8_t> {
    template <Format F>
    static __m256i codes(const uint8_t* blk) {
        if constexpr (F == Format::Q8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kCodesAt<F>));
        else return q4_bytes(blk + kCodesAt<F>);
    }
    template <Format F>
    static __m256 dot(__m256i c, const int8_t* x) { return block_dot8<F == Format::Q8_0>(c, x); }
};

// The R results of an output row from two accumulators and two offset sums per activation row:
// y[(m0 + r) O] = (or +=) their total.
template <int R>
inline void store_rows(const __m256 (&acc)[2][R], const float (&offset)[2][R], float* y, int64_t O, int64_t m0,
                       bool add) {
    for (int r = 0; r < R; ++r) {
        const float v = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + offset[0][r] + offset[1][r];
        float& out = y[(m0 + r) * O];
        out = add ? out + v : v;
    }
}

// One output row against R activation rows (R a compile-time constant, so the accumulators live
// in registers): each weight block is decoded once and used R times. Two accumulators per row,
// for even and odd blocks: with one, every block's fma waits for the previous block's (4
// cycles), longer than the block's other work takes. With `add`, y += the product (the residual
// stream), else y = the product.
template <Format F, typename Q, int R>
inline void gguf_row(const QuantizedRows<Q>& xq, int64_t m0, const uint8_t* row, int64_t blocks, float* y, int64_t O,
                     bool add) {
    __m256 acc[2][R];
    float offset[2][R];
    for (int r = 0; r < R; ++r) {
        acc[0][r] = acc[1][r] = _mm256_setzero_ps();
        offset[0][r] = offset[1][r] = 0.0f;
    }
    auto block = [&](int64_t b, __m256* a, float* off) {
        const uint8_t* blk = row + b * block_bytes(F);
        const float d = half_to_float(blk), mterm = block_offset<F>(blk, d);
        const auto codes = Dot<Q>::template codes<F>(blk);
        for (int r = 0; r < R; ++r) {
            const int64_t xb = (m0 + r) * blocks + b;
            const __m256 dot = Dot<Q>::template dot<F>(codes, xq.q.data() + xb * kGroup);
            a[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * xq.scale[xb]), a[r]);
            if constexpr (F != Format::Q8_0) off[r] += mterm * xq.sum[xb];
        }
    };
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        block(b, acc[0], offset[0]);
        block(b + 1, acc[1], offset[1]);
    }
    if (b < blocks) block(b, acc[0], offset[0]);
    store_rows<R>(acc, offset, y, O, m0, add);
}

template <Format F, typename Q>
void gguf_rows(const QuantizedRows<Q>& xq, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O,
               int64_t o_begin, int64_t o_end, bool add) {
    const int64_t blocks = I / kGroup, row_bytes = blocks * block_bytes(F);
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint8_t* row = w + o * row_bytes;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) gguf_row<F, Q, 4>(xq, m0, row, blocks, y + o, O, add);
        with_count<3>(M - m0, [&](auto r) { gguf_row<F, Q, decltype(r)::value>(xq, m0, row, blocks, y + o, O, add); });
    }
}

// Eight weights as floats: fp32 as they are; bf16 is the top half of an fp32, so a shift.
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline float load1(const float* w) { return *w; }
inline float load1(const uint16_t* w) {
    const uint32_t bits = static_cast<uint32_t>(*w) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
}  // namespace
