// Matrix-vector products for decoding on x86 CPUs with AVX2 (genkit/native/kernels.py builds this).
//
// Decoding one token multiplies a few activation rows by every weight matrix of the model, so a
// step is bound by how fast the weights stream from memory. torch's CPU products reach about a
// third of this machine's memory bandwidth at one row (fp32) and its int4 kernel wants bf16
// activations; these loops read each weight once, in storage order, on all threads, and keep
// the activations in fp32.
//
//   y[m, o] = sum_i x[m, i] * W[o, i]        x: (M, I) float32, y: (M, O) float32
//
// Weight formats (rows of W in memory order):
//   dense_f32   W as a contiguous (O, I) float32 tensor
//   gguf Q4_1   blocks of 32 weights: f16 d, f16 m, 16 bytes of nibbles;   w = q * d + m
//   gguf Q4_0   blocks of 32 weights: f16 d, 16 bytes of nibbles;          w = (q - 8) * d
//   gguf Q8_0   blocks of 32 weights: f16 d, 32 signed bytes;              w = q * d
//   F16, Q5_0, Q5_1, Q2_K .. Q6_K: rows decoded to floats (blocks.h), then the float loops
// (formats.def lists every format with its code and block size, for this file and kernels.py).
// In a Q4 block, byte j holds weight j in its low nibble and weight j + 16 in its high one.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "blocks.h"

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

// sum_j code_j * x_j over one block, as eight int32 partial sums turned float. No overflow:
// |code| <= 127 and |x| <= 32767, 32 products.
inline __m256 block_dot(const Codes& c, const int16_t* x) {
    const __m256i lo = _mm256_madd_epi16(c.first, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    const __m256i hi = _mm256_madd_epi16(c.second, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
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

// Activations for the integer products: each block of 32 inputs as int16 times one float scale
// (amax / 32767), so quantising them costs about 1e-5 of relative precision (llama.cpp's signed
// bytes cost 1e-2 and flip close greedy choices), plus the block's sum for the offset terms of the Q4
// formats (w = q d + m adds m * sum(x) per block). That sum is taken over the quantised inputs,
// not the exact ones: code and offset terms then see the same x and their large parts cancel.
struct QuantizedRows {
    std::vector<int16_t> q;
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
                double squares = 0.0;
                for (int64_t i = 0; i < I; ++i) squares += static_cast<double>(out[i]) * out[i];
                const float inv_rms = 1.0f / std::sqrt(static_cast<float>(squares / I) + eps);
                for (int64_t i = 0; i < I; ++i) out[i] = out[i] * inv_rms * norm[i];
            }
        }
    });
    return rows;
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t I) {
    const int64_t blocks = I / kGroup;
    QuantizedRows r{std::vector<int16_t>(M * I), std::vector<float>(M * blocks), std::vector<float>(M * blocks)};
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
        const float* row = x + m * I;
        for (int64_t b = 0; b < blocks; ++b) {
            const float* v = row + b * kGroup;
            float amax = 0.0f;
            for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(v[j]));
            const float scale = amax / 32767.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            int qsum = 0;
            int16_t* q = r.q.data() + (m * blocks + b) * kGroup;
            for (int j = 0; j < kGroup; ++j) {
                q[j] = static_cast<int16_t>(std::nearbyint(v[j] * inv));
                qsum += q[j];
            }
            r.scale[m * blocks + b] = scale;
            r.sum[m * blocks + b] = scale * static_cast<float>(qsum);
        }
    }
    });
    return r;
}

// One output row against R activation rows (R a compile-time constant, so the accumulators live
// in registers): the weight block is decoded once and used R times.
// With `add`, y += the product (the residual stream), else y = the product.
template <Format F, int R>
inline void gguf_row(const QuantizedRows& xq, int64_t m0, const uint8_t* row, int64_t blocks, float* y, int64_t O,
                     bool add) {
    __m256 acc[R];
    float offset[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* blk = row + b * block_bytes(F);
        const float d = half_to_float(blk), mterm = block_offset<F>(blk, d);
        const Codes codes = block_codes<F>(blk);
        for (int r = 0; r < R; ++r) {
            const int64_t xb = (m0 + r) * blocks + b;
            const __m256 dot = block_dot(codes, xq.q.data() + xb * kGroup);
            acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * xq.scale[xb]), acc[r]);
            if constexpr (F != Format::Q8_0) offset[r] += mterm * xq.sum[xb];
        }
    }
    for (int r = 0; r < R; ++r) {
        const float v = hsum(acc[r]) + offset[r];
        float& out = y[(m0 + r) * O];
        out = add ? out + v : v;
    }
}

template <Format F>
void gguf_rows(const QuantizedRows& xq, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O,
               int64_t o_begin, int64_t o_end, bool add) {
    const int64_t blocks = I / kGroup, row_bytes = blocks * block_bytes(F);
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint8_t* row = w + o * row_bytes;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) gguf_row<F, 4>(xq, m0, row, blocks, y + o, O, add);
        with_count<3>(M - m0, [&](auto r) { gguf_row<F, decltype(r)::value>(xq, m0, row, blocks, y + o, O, add); });
    }
}

// The same products with activations as signed bytes (amax / 127 per block of 32, as llama.cpp
// quantises them): a block's dot product is then one maddubs (unsigned codes times signed bytes,
// pairs summed to int16) and one madd, about half the instructions of the int16 path, for about
// 4e-3 relative error in each product instead of 1e-5. Greedy output can drift from fp32's.
struct QuantizedRows8 {
    std::vector<int8_t> q;
    std::vector<float> scale, sum;
};

QuantizedRows8 quantize_rows8(const float* x, int64_t M, int64_t I) {
    const int64_t blocks = I / kGroup;
    QuantizedRows8 r{std::vector<int8_t>(M * I), std::vector<float>(M * blocks), std::vector<float>(M * blocks)};
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            for (int64_t b = 0; b < blocks; ++b) {
                const float* v = x + m * I + b * kGroup;
                float amax = 0.0f;
                for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(v[j]));
                const float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
                int qsum = 0;
                int8_t* q = r.q.data() + (m * blocks + b) * kGroup;
                for (int j = 0; j < kGroup; ++j) {
                    q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
                    qsum += q[j];
                }
                r.scale[m * blocks + b] = scale;
                r.sum[m * blocks + b] = scale * static_cast<float>(qsum);
            }
        }
    });
    return r;
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
    const __m256i pairs = _mm256_maddubs_epi16(codes, xv);  // |pair| <= 2 * 127 * 127 fits int16
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// Two accumulators per activation row, for even and odd blocks: with one, every block's fma
// waits for the previous block's (4 cycles), longer than the block's other work takes.
template <Format F, int R>
inline void gguf_row8(const QuantizedRows8& xq, int64_t m0, const uint8_t* row, int64_t blocks, float* y, int64_t O,
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
        __m256i codes;
        if constexpr (F == Format::Q8_0) codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kCodesAt<F>));
        else codes = q4_bytes(blk + kCodesAt<F>);
        for (int r = 0; r < R; ++r) {
            const int64_t xb = (m0 + r) * blocks + b;
            const __m256 dot = block_dot8<F == Format::Q8_0>(codes, xq.q.data() + xb * kGroup);
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
    for (int r = 0; r < R; ++r) {
        const float v = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + offset[0][r] + offset[1][r];
        float& out = y[(m0 + r) * O];
        out = add ? out + v : v;
    }
}

template <Format F>
void gguf_rows8(const QuantizedRows8& xq, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O,
                int64_t o_begin, int64_t o_end, bool add) {
    const int64_t blocks = I / kGroup, row_bytes = blocks * block_bytes(F);
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint8_t* row = w + o * row_bytes;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) gguf_row8<F, 4>(xq, m0, row, blocks, y + o, O, add);
        with_count<3>(M - m0, [&](auto r) { gguf_row8<F, decltype(r)::value>(xq, m0, row, blocks, y + o, O, add); });
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
std::vector<float> pack_panels(const float* x, int64_t M, int64_t I) {
    const int64_t P = (M + kPanel - 1) / kPanel;
    std::vector<float> panels(P * I * kPanel, 0.0f);
    for (int64_t m = 0; m < M; ++m) {
        float* out = panels.data() + (m / kPanel) * I * kPanel + m % kPanel;
        const float* row = x + m * I;
        for (int64_t i = 0; i < I; ++i) out[i * kPanel] = row[i];
    }
    return panels;
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

// OR weight rows against every panel: the rows come from memory on the first tile and from
// cache on the others.
template <int OR, typename W>
inline void panel_tiles(const float* panels, int64_t M, const W* wr, int64_t I, float* y, int64_t o0, int64_t O,
                        bool add) {
    const int64_t P = (M + kPanel - 1) / kPanel;
    int64_t p = 0;
    for (; p + kPanelsAtOnce <= P; p += kPanelsAtOnce) panel_tile<OR, kPanelsAtOnce>(panels, p, M, wr, I, y, o0, O, add);
    if (p < P) panel_tile<OR, 1>(panels, p, M, wr, I, y, o0, O, add);
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

// One weight row of GGUF blocks as floats (w = q d + m, (q - 8) d or q d).
template <Format F>
void dequantize_row(const uint8_t* row, int64_t I, float* out) {
    for (int64_t b = 0; b < I / kGroup; ++b) {
        const uint8_t* blk = row + b * block_bytes(F);
        const float d = half_to_float(blk);
        const Codes codes = block_codes<F>(blk);
        const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(block_offset<F>(blk, d));
        float* o = out + b * kGroup;
        for (const __m256i c : {codes.first, codes.second}) {
            const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(c));
            const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(c, 1));
            _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), dv, mv));
            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), dv, mv));
            o += 16;
        }
    }
}

// Prompts through GGUF weights: a tile's weight rows are decoded to floats once (into a few KB
// that stay in L1) and multiplied with the panels, so that many activation rows run at the
// float product's speed instead of the integer dot products'.
template <Format F>
void gguf_panel_block(const float* panels, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O,
                      int64_t o_begin, int64_t o_end, bool add) {
    const int64_t row_bytes = I / kGroup * block_bytes(F);
    std::vector<float> rows(kPanelRowsO * I);
    for (int64_t o = o_begin; o < o_end; o += kPanelRowsO) {
        const int64_t n = std::min<int64_t>(kPanelRowsO, o_end - o);
        for (int64_t r = 0; r < n; ++r) dequantize_row<F>(w + (o + r) * row_bytes, I, rows.data() + r * I);
        if (n == kPanelRowsO) panel_tiles<kPanelRowsO>(panels, M, rows.data(), I, y, o, O, add);
        else with_count<kPanelRowsO - 1>(n, [&](auto c) { panel_tiles<decltype(c)::value>(panels, M, rows.data(), I, y, o, O, add); });
    }
}

// A grain of 16 output rows keeps threads busy on the small (192-row) products too.
constexpr int64_t kGrain = 16;

// Which loop a dense product takes, by activation rows (measured on this 2-core CPU, fp32):
// up to 8 rows a step is bound by reading the weights, and dense_rows streams them best; from
// there to 256 rows it is compute-bound and the panels run 1.3-2x faster than torch's product
// (64 rows: 135-185 GFLOPS against 120-135); beyond, torch's product (MKL) is as fast: prompts.
constexpr int64_t kMaxStreamRows = 8, kMaxPanelRows = 256;
// GGUF weights: from this many rows, decoding a tile of weights to floats for the panels beats
// the integer dot products (which decode each block once per 4 activation rows).
// (measured, embedded model's Q4_1 layers: 16 rows 91-97 GFLOPS against 65-71, 64 rows 120 against 65).
constexpr int64_t kMinGgufPanelRows = 16;

// The weight formats (formats.def): each one's code, weights and bytes per block.
struct FormatInfo {
    const char* name;
    int64_t code, weights, bytes;
};
constexpr FormatInfo kFormats[] = {
#define GENKIT_FORMAT(name, code, weights, bytes) {#name, code, weights, bytes},
#include "formats.def"
#undef GENKIT_FORMAT
};

const FormatInfo* find_format(int64_t code) {
    for (const auto& f : kFormats)
        if (f.code == code) return &f;
    return nullptr;
}

// A weight as the products see it: one or more parts stacked by output rows (fused q/k/v or
// gate/up, whose parts a GGUF file may keep in different formats). A part's kind is its
// format's code; a Q4_0 / Q4_1 / Q8_0 kind plus kInt8Activations multiplies the same blocks with
// byte activations.
constexpr int64_t kF32 = 3, kBF16 = 4, kInt8Activations = 32;
struct Part {
    torch::Tensor data;
    int64_t kind, out;
};
struct Weight {
    std::vector<Part> parts;
    int64_t in, out;
};

Part make_part(torch::Tensor data, int64_t kind, int64_t in_features) {
    TORCH_CHECK(data.is_contiguous(), "weights must be contiguous");
    if (kind == kF32 || kind == kBF16) {
        TORCH_CHECK(data.dim() == 2 && data.size(1) == in_features &&
                        data.scalar_type() == (kind == kF32 ? torch::kFloat32 : torch::kBFloat16),
                    "a dense weight must be (out, in) float32 or bfloat16");
        return {data, kind, data.size(0)};
    }
    const int64_t format = kind >= kInt8Activations ? kind - kInt8Activations : kind;
    const FormatInfo* f = find_format(format);
    TORCH_CHECK(f && data.scalar_type() == torch::kUInt8 && (kind < kInt8Activations || format <= 2),
                "unknown weight kind ", kind);
    TORCH_CHECK(in_features % f->weights == 0, "in_features must be a multiple of ", f->weights, " for ", f->name);
    const int64_t row_bytes = in_features / f->weights * f->bytes;
    TORCH_CHECK(data.numel() % row_bytes == 0, "blocks do not match in_features");
    return {data, kind, data.numel() / row_bytes};
}

Weight make_weight(const std::vector<torch::Tensor>& data, const std::vector<int64_t>& kinds, int64_t in_features) {
    TORCH_CHECK(!data.empty() && data.size() == kinds.size(), "one kind per weight part");
    Weight w{{}, in_features, 0};
    for (size_t i = 0; i < data.size(); ++i) {
        w.parts.push_back(make_part(data[i], kinds[i], in_features));
        w.out += w.parts.back().out;
    }
    return w;
}

Weight make_weight(torch::Tensor data, int64_t kind, int64_t in_features) {
    return make_weight(std::vector<torch::Tensor>{data}, std::vector<int64_t>{kind}, in_features);
}

// Decoded formats (blocks.h), a few activation rows: each weight row is decoded to floats once
// and multiplied with every activation row by the dense loop.
template <int64_t Code>
void decoded_rows(const float* x, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O, int64_t o_begin,
                  int64_t o_end, bool add) {
    const FormatInfo* f = find_format(Code);
    const int64_t row_bytes = I / f->weights * f->bytes;
    std::vector<float> row(I);
    for (int64_t o = o_begin; o < o_end; ++o) {
        blocks::decode_row<Code>(w + o * row_bytes, I, row.data());
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) dense_row<4>(x, m0, row.data(), I, y + o, O, add);
        with_count<3>(M - m0, [&](auto r) { dense_row<decltype(r)::value>(x, m0, row.data(), I, y + o, O, add); });
    }
}

// Decoded formats, many activation rows: a tile of weight rows decoded, then the panels.
template <int64_t Code>
void decoded_panel_block(const float* panels, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O,
                         int64_t o_begin, int64_t o_end, bool add) {
    const FormatInfo* f = find_format(Code);
    const int64_t row_bytes = I / f->weights * f->bytes;
    std::vector<float> rows(kPanelRowsO * I);
    for (int64_t o = o_begin; o < o_end; o += kPanelRowsO) {
        const int64_t n = std::min<int64_t>(kPanelRowsO, o_end - o);
        for (int64_t r = 0; r < n; ++r) blocks::decode_row<Code>(w + (o + r) * row_bytes, I, rows.data() + r * I);
        if (n == kPanelRowsO) panel_tiles<kPanelRowsO>(panels, M, rows.data(), I, y, o, O, add);
        else with_count<kPanelRowsO - 1>(n, [&](auto c) { panel_tiles<decltype(c)::value>(panels, M, rows.data(), I, y, o, O, add); });
    }
}

// The activation rows in the forms the loops take, each made once per product on first need.
struct Activations {
    const float* rows;
    int64_t M, I;
    std::optional<QuantizedRows> q16;
    std::optional<QuantizedRows8> q8;
    std::vector<float> panels;
    const QuantizedRows& int16() { if (!q16) q16 = quantize_rows(rows, M, I); return *q16; }
    const QuantizedRows8& int8() { if (!q8) q8 = quantize_rows8(rows, M, I); return *q8; }
    const float* panel() { if (panels.empty()) panels = pack_panels(rows, M, I); return panels.data(); }
};

// y[:, 0 .. part.out) (=, or += with `add`) rows @ part.T; y's rows are O apart.
void part_product(Activations& a, const Part& p, float* y, int64_t O, bool add) {
    const int64_t M = a.M, I = a.I, P = p.out;
    const float* rows = a.rows;
    const int64_t format = p.kind >= kInt8Activations ? p.kind - kInt8Activations : p.kind;
    if (blocks::decoded(format)) {
        const uint8_t* wp = p.data.data_ptr<uint8_t>();
        const float* panels = M >= kMinGgufPanelRows ? a.panel() : nullptr;
        at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
            blocks::with_decoded(format, [&](auto K) {
                if (panels) decoded_panel_block<decltype(K)::value>(panels, wp, y, M, I, O, b, e, add);
                else decoded_rows<decltype(K)::value>(rows, wp, y, M, I, O, b, e, add);
            });
        });
    } else if (format < kF32) {  // Q4_0, Q4_1, Q8_0: integer dot products
        const Format f = static_cast<Format>(format);
        const uint8_t* wp = p.data.data_ptr<uint8_t>();
        if (M >= kMinGgufPanelRows) {
            const float* panels = a.panel();
            at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
                with_format(f, [&](auto F) { gguf_panel_block<decltype(F)::value>(panels, wp, y, M, I, O, b, e, add); });
            });
        } else if (p.kind >= kInt8Activations) {
            const QuantizedRows8& xq = a.int8();
            at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
                with_format(f, [&](auto F) { gguf_rows8<decltype(F)::value>(xq, wp, y, M, I, O, b, e, add); });
            });
        } else {
            const QuantizedRows& xq = a.int16();
            at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
                with_format(f, [&](auto F) { gguf_rows<decltype(F)::value>(xq, wp, y, M, I, O, b, e, add); });
            });
        }
    } else if (M <= kMaxStreamRows) {
        at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
            if (p.kind == kF32) dense_rows(rows, p.data.data_ptr<float>(), y, M, I, O, b, e, add);
            else dense_rows(rows, reinterpret_cast<const uint16_t*>(p.data.data_ptr<at::BFloat16>()), y, M, I, O, b, e, add);
        });
    } else if (M <= kMaxPanelRows) {
        const float* panels = a.panel();
        at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
            if (p.kind == kF32) panel_block(panels, p.data.data_ptr<float>(), y, M, I, O, b, e, add);
            else panel_block(panels, reinterpret_cast<const uint16_t*>(p.data.data_ptr<at::BFloat16>()), y, M, I, O, b, e, add);
        });
    } else {  // many rows (a large batch): torch's product, then the same y = / += as above
        auto xt = torch::from_blob(const_cast<float*>(rows), {M, I}, torch::kFloat32);
        auto result = p.kind == kF32 ? torch::mm(xt, p.data.t()) : torch::mm(xt.to(torch::kBFloat16), p.data.t()).to(torch::kFloat32);
        auto out = torch::from_blob(y, {M, O}, torch::kFloat32).narrow(1, 0, P);
        if (add) out.add_(result);
        else out.copy_(result);
    }
}

// y (M, w.out) = or += prepare_rows(x) @ W.T, for x (M, w.in) or (M, 2 w.in) with `glu`.
void product(const float* x, int64_t M, const Weight& w, const float* norm, float eps, bool glu, float* y,
             bool add) {
    std::vector<float> buffer;
    Activations a{prepare_rows(x, M, w.in, norm, eps, glu, buffer), M, w.in, {}, {}, {}};
    int64_t column = 0;
    for (const Part& p : w.parts) {
        part_product(a, p, y + column, w.out, add);
        column += p.out;
    }
}

void check_x(const torch::Tensor& x, int64_t in_features, bool glu) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
                "x must be a contiguous (M, I) float32 tensor");
    const int64_t want = glu ? 2 * in_features : in_features;
    TORCH_CHECK(x.size(1) == want, "x has ", x.size(1), " features, the weight wants ", want);
}

const float* norm_ptr(const std::optional<torch::Tensor>& norm, int64_t in_features) {
    if (!norm) return nullptr;
    TORCH_CHECK(norm->scalar_type() == torch::kFloat32 && norm->is_contiguous() && norm->numel() == in_features,
                "norm must be a contiguous float32 vector of in_features");
    return norm->data_ptr<float>();
}

torch::Tensor matmul(const torch::Tensor& x, const Weight& w, const std::optional<torch::Tensor>& norm, double eps,
                     bool glu) {
    check_x(x, w.in, glu);
    auto y = torch::empty({x.size(0), w.out}, x.options());
    product(x.data_ptr<float>(), x.size(0), w, norm_ptr(norm, w.in), static_cast<float>(eps), glu, y.data_ptr<float>(),
            false);
    return y;
}

// One decode step of attention for every row and head, with the rotary embedding and the write
// of the new key and value into the cache ((B, kv_heads, capacity, d) per layer):
// a dozen torch calls per layer otherwise, which cost more than the arithmetic at one token.
//   x (B, (hq + 2 hk) d): this token's projections; cs, sn (B, d): its rotation, with the sign
//   of the first half folded into sn (y = x cos + roll(x, d/2) sin); slot: where the token goes;
//   start (B): each row's first real slot (left padding before it is never looked at).
//   out (B, hq d).
struct AttentionShape {
    int64_t B, hq, hk, d, cap;
};

// Eight dot products at once: q against keys k, k + d, ..., k + 7d (d a multiple of 8), summed
// across lanes with one hadd tree instead of eight separate horizontal sums.
inline __m256 dot8(const float* q, const float* k, int64_t d) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
        const __m256 qi = _mm256_loadu_ps(q + i);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + j * d + i), acc[j]);
    }
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// out[0 .. 8 NV) = sum_t p[t] * values[t][0 .. 8 NV): NV output vectors kept in registers for the
// whole sweep over t (accumulating in memory would wait on a store and a load every step).
template <int NV>
inline void weighted_sum(const float* p, const float* values, int64_t n, int64_t d, float* out) {
    __m256 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
        const __m256 w = _mm256_set1_ps(p[t]);
        for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(values + t * d + 8 * v), acc[v]);
    }
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}

// One head's attention over its real slots: scores (AVX2 when d is a multiple of 8), softmax,
// weighted sum of the values. p holds room for n rounded up to 8.
void attend(const float* q, const float* keys, const float* values, int64_t n, int64_t d, float scale, float* p,
            float* out) {
    const bool wide = d % 8 == 0;  // head sizes are multiples of 8 in practice
    int64_t t = 0;
    if (wide)
        for (; t + 8 <= n; t += 8) _mm256_storeu_ps(p + t, _mm256_mul_ps(dot8(q, keys + t * d, d), _mm256_set1_ps(scale)));
    for (; t < n; ++t) {
        float dot = 0.0f;
        for (int64_t i = 0; i < d; ++i) dot += q[i] * keys[t * d + i];
        p[t] = dot * scale;
    }
    float top = -INFINITY;
    for (t = 0; t < n; ++t) top = std::max(top, p[t]);
    const int64_t padded = (n + 7) / 8 * 8;
    for (t = n; t < padded; ++t) p[t] = top;  // exp(0) = 1 in the tail, zeroed just below
    const __m256 shift = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    for (t = 0; t < padded; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), shift));
        if (t + 8 > n) {  // the tail lanes beyond n
            alignas(32) float lanes[8];
            _mm256_store_ps(lanes, e);
            for (int64_t j = n - t; j < 8; ++j) lanes[j] = 0.0f;
            e = _mm256_load_ps(lanes);
        }
        _mm256_storeu_ps(p + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    const float inv = 1.0f / hsum(sum);
    for (t = 0; t < n; ++t) p[t] *= inv;
    int64_t c = 0;
    if (wide) {
        for (; c + 64 <= d; c += 64) weighted_sum<8>(p, values + c, n, d, out + c);
        with_count<7>((d - c) / 8, [&](auto nv) { weighted_sum<decltype(nv)::value>(p, values + c, n, d, out + c); });
        return;
    }
    std::fill(out, out + d, 0.0f);
    for (t = 0; t < n; ++t)
        for (int64_t i = 0; i < d; ++i) out[i] += p[t] * values[t * d + i];
}

// The rotary embedding of one head: out = x cos + roll(x, d/2) sin (sign folded into sin).
inline void rotate(const float* x, const float* c, const float* sn, int64_t d, float* out) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * c[i] + x[i + half] * sn[i];
    for (int64_t i = half; i < d; ++i) out[i] = x[i] * c[i] + x[i - half] * sn[i];
}

void attention(const AttentionShape& s, const float* x, const float* cs, const float* sn, float* kc, float* vc,
               int64_t slot, const int64_t* start, float* o) {
    const int64_t B = s.B, hq = s.hq, hk = s.hk, d = s.d, cap = s.cap;
    std::vector<float> q(B * hq * d);
    at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            const float* row = x + b * (hq + 2 * hk) * d;
            for (int64_t h = 0; h < hq; ++h) rotate(row + h * d, cs + b * d, sn + b * d, d, q.data() + (b * hq + h) * d);
            for (int64_t g = 0; g < hk; ++g) {
                const int64_t at = ((b * hk + g) * cap + slot) * d;
                rotate(row + (hq + g) * d, cs + b * d, sn + b * d, d, kc + at);
                std::copy(row + (hq + hk + g) * d, row + (hq + hk + g + 1) * d, vc + at);
            }
        }
    });
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    at::parallel_for(0, B * hq, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> p(slot + 9);
        for (int64_t idx = begin; idx < end; ++idx) {
            const int64_t b = idx / hq, h = idx % hq, g = h / (hq / hk), t0 = start[b];
            const int64_t base = ((b * hk + g) * cap + t0) * d;
            attend(q.data() + idx * d, kc + base, vc + base, slot + 1 - t0, d, scale, p.data(), o + idx * d);
        }
    });
}

void check_cache(const torch::Tensor& k, const torch::Tensor& v, const AttentionShape& s, int64_t slot) {
    TORCH_CHECK(k.scalar_type() == torch::kFloat32 && k.is_contiguous() && v.scalar_type() == torch::kFloat32 &&
                    v.is_contiguous() && k.dim() == 4 && k.size(0) == s.B && k.size(1) == s.hk && k.size(3) == s.d &&
                    v.sizes() == k.sizes() && slot < k.size(2),
                "the KV cache does not fit this step");
}

void check_rotation(const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& first, int64_t B,
                    int64_t d) {
    for (const auto* t : {&cos, &sin})
        TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->size(0) == B && t->size(1) == d,
                    "cos / sin must be contiguous float32 (B, head_dim)");
    TORCH_CHECK(first.numel() == B && first.scalar_type() == torch::kLong && first.is_contiguous(),
                "first must hold one int64 per row");
}

// A whole decode step's transformer layers in one call: per layer, the norm + q/k/v product,
// attention with the cache write, the output product added to the residual stream, the norm +
// gate/up product and the GLU + down product added again. From Python these were five calls and
// a dozen tensor operations per layer, several milliseconds a step: more than a 4-bit model's
// weights take to stream. Built once per model (Python's DecodeLlama.stack()).
class DecodeStack {
  public:
    DecodeStack(int64_t hq, int64_t hk, int64_t head_dim, double eps)
        : hq_(hq), hk_(hk), d_(head_dim), eps_(static_cast<float>(eps)) {}

    // Each weight as its parts (stacked by output rows) and their kinds.
    using Parts = std::vector<torch::Tensor>;
    using Kinds = std::vector<int64_t>;
    void add_layer(torch::Tensor attn_norm, torch::Tensor ffn_norm, Parts qkv, Kinds qkv_kind, Parts o, Kinds o_kind,
                   Parts gate_up, Kinds gate_up_kind, Parts down, Kinds down_kind) {
        const int64_t hidden = attn_norm.numel(), qkv_out = (hq_ + 2 * hk_) * d_;
        Layer L{attn_norm, ffn_norm, make_weight(qkv, qkv_kind, hidden), make_weight(o, o_kind, hq_ * d_),
                make_weight(gate_up, gate_up_kind, hidden), {}};
        L.down = make_weight(down, down_kind, L.gate_up.out / 2);
        TORCH_CHECK(L.qkv.out == qkv_out && L.o.out == hidden && L.down.out == hidden && ffn_norm.numel() == hidden &&
                        attn_norm.scalar_type() == torch::kFloat32 && ffn_norm.scalar_type() == torch::kFloat32,
                    "layer ", layers_.size(), " does not fit the model's shape");
        layers_.push_back(std::move(L));
    }

    // x (B, hidden): the new token's embeddings, updated in place to the last layer's output.
    // states (n_layers, B, hidden), when given, receives each layer's input (DoLa, contrastive).
    void forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> keys,
                 std::vector<torch::Tensor> values, int64_t slot, torch::Tensor first,
                 std::optional<torch::Tensor> states) {
        const int64_t B = x.size(0), hidden = x.size(1), n = static_cast<int64_t>(layers_.size());
        TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && n > 0 &&
                        hidden == layers_[0].attn_norm.numel(),
                    "x must be contiguous float32 (B, hidden)");
        TORCH_CHECK(static_cast<int64_t>(keys.size()) == n && static_cast<int64_t>(values.size()) == n,
                    "one key and one value buffer per layer");
        check_rotation(cos, sin, first, B, d_);
        const AttentionShape s{B, hq_, hk_, d_, keys[0].size(2)};
        for (int64_t i = 0; i < n; ++i) check_cache(keys[i], values[i], s, slot);
        TORCH_CHECK(!states || (states->scalar_type() == torch::kFloat32 && states->is_contiguous() &&
                                states->numel() == n * B * hidden),
                    "states must be contiguous float32 (n_layers, B, hidden)");
        float* saved = states ? states->data_ptr<float>() : nullptr;
        std::vector<float> qkv(B * (hq_ + 2 * hk_) * d_), attn(B * hq_ * d_), gate_up(B * layers_[0].gate_up.out);
        float* h = x.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i) {
            const Layer& L = layers_[i];
            if (saved) std::copy(h, h + B * hidden, saved + i * B * hidden);
            product(h, B, L.qkv, L.attn_norm.data_ptr<float>(), eps_, false, qkv.data(), false);
            attention(s, qkv.data(), cos.data_ptr<float>(), sin.data_ptr<float>(), keys[i].data_ptr<float>(),
                      values[i].data_ptr<float>(), slot, first.data_ptr<int64_t>(), attn.data());
            product(attn.data(), B, L.o, nullptr, 0.0f, false, h, true);
            gate_up.resize(B * L.gate_up.out);
            product(h, B, L.gate_up, L.ffn_norm.data_ptr<float>(), eps_, false, gate_up.data(), false);
            product(gate_up.data(), B, L.down, nullptr, 0.0f, true, h, true);
        }
    }

  private:
    struct Layer {
        torch::Tensor attn_norm, ffn_norm;
        Weight qkv, o, gate_up, down;
    };
    int64_t hq_, hk_, d_;
    float eps_;
    std::vector<Layer> layers_;
};

}  // namespace

torch::Tensor gguf_matmul(torch::Tensor x, torch::Tensor blocks, int64_t kind, int64_t in_features,
                          std::optional<torch::Tensor> norm, double eps, bool glu) {
    return matmul(x, make_weight(blocks, kind, in_features), norm, eps, glu);
}

torch::Tensor parts_matmul(torch::Tensor x, std::vector<torch::Tensor> parts, std::vector<int64_t> kinds,
                           int64_t in_features, std::optional<torch::Tensor> norm, double eps, bool glu) {
    return matmul(x, make_weight(parts, kinds, in_features), norm, eps, glu);
}

std::vector<std::tuple<std::string, int64_t, int64_t, int64_t>> formats() {
    std::vector<std::tuple<std::string, int64_t, int64_t, int64_t>> out;
    for (const auto& f : kFormats) out.emplace_back(f.name, f.code, f.weights, f.bytes);
    return out;
}

torch::Tensor dense_matmul(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> norm, double eps, bool glu) {
    TORCH_CHECK(w.dim() == 2, "w must be an (out, in) matrix");
    return matmul(x, make_weight(w, w.scalar_type() == torch::kBFloat16 ? kBF16 : kF32, w.size(1)), norm, eps, glu);
}

torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, int64_t slot, torch::Tensor first, int64_t hq, int64_t hk) {
    const int64_t B = qkv.size(0), d = k_cache.size(3);
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous() && hq % hk == 0 &&
                    qkv.size(1) == (hq + 2 * hk) * d,
                "decode_attention: qkv must be contiguous float32 (B, (hq + 2 hk) d)");
    const AttentionShape s{B, hq, hk, d, k_cache.size(2)};
    check_cache(k_cache, v_cache, s, slot);
    check_rotation(cos, sin, first, B, d);
    auto out = torch::empty({B, hq * d}, qkv.options());
    attention(s, qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr<float>(),
              v_cache.data_ptr<float>(), slot, first.data_ptr<int64_t>(), out.data_ptr<float>());
    return out;
}

// Every entry point works on tensors only and lets go of the GIL while it computes: a server's
// HTTP thread (genkit serve) keeps answering while the engine thread runs a step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("decode_attention", &decode_attention, "rotary embedding, KV write and attention for one new token",
          py::call_guard<py::gil_scoped_release>());
    m.def("gguf_matmul", &gguf_matmul, "rms_norm(x) @ W.T for W in GGUF blocks of a kind from formats.def (Q4_0 / Q4_1 / Q8_0 +32: byte activations)",
          py::arg("x"), py::arg("blocks"), py::arg("kind"), py::arg("in_features"), py::arg("norm") = py::none(),
          py::arg("eps") = 0.0, py::arg("glu") = false, py::call_guard<py::gil_scoped_release>());
    m.def("parts_matmul", &parts_matmul, "rms_norm(x) @ W.T for W stacked by rows from parts of any kinds",
          py::arg("x"), py::arg("parts"), py::arg("kinds"), py::arg("in_features"), py::arg("norm") = py::none(),
          py::arg("eps") = 0.0, py::arg("glu") = false, py::call_guard<py::gil_scoped_release>());
    m.def("formats", &formats, "(name, code, weights per block, bytes per block) of every weight format");
    m.def("dense_matmul", &dense_matmul, "rms_norm(x) @ W.T for a contiguous float32 or bfloat16 W, for few rows of x",
          py::arg("x"), py::arg("w"), py::arg("norm") = py::none(), py::arg("eps") = 0.0, py::arg("glu") = false,
          py::call_guard<py::gil_scoped_release>());
    py::class_<DecodeStack>(m, "DecodeStack")
        .def(py::init<int64_t, int64_t, int64_t, double>())
        .def("add_layer", &DecodeStack::add_layer)
        .def("forward", &DecodeStack::forward, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("keys"),
             py::arg("values"), py::arg("slot"), py::arg("first"), py::arg("states") = py::none(),
             py::call_guard<py::gil_scoped_release>());
}
