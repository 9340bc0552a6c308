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
// In a Q4 block, byte j holds weight j in its low nibble and weight j + 16 in its high one.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int kRowsAtOnce = 4;  // activation rows sharing one read of a weight block

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

int64_t block_bytes(Format f) { return f == Format::Q4_1 ? 20 : f == Format::Q4_0 ? 18 : 34; }

// Activations for the integer products: each block of 32 inputs as int16 times one float scale
// (amax / 32767), so quantising them costs about 1e-5 of relative precision (llama.cpp's signed
// bytes cost 1e-2 and flip close greedy choices), plus the block's sum for the offset terms of the Q4
// formats (w = q d + m adds m * sum(x) per block). That sum is taken over the quantised inputs,
// not the exact ones: code and offset terms then see the same x and their large parts cancel.
struct QuantizedRows {
    std::vector<int16_t> q;
    std::vector<float> scale, sum;
};

// The rows a product actually multiplies, computed from x in one pass: with `glu`, x holds
// 2I columns and the input is silu(x[:, :I]) * x[:, I:] (the MLP's gate and up halves); with
// `norm`, an RMS norm with that weight. Each would otherwise be a few separate torch calls per
// layer, costing more than their arithmetic. Returns x itself when there is nothing to do.
const float* prepare_rows(const float* x, int64_t M, int64_t I, const float* norm, float eps, bool glu,
                          std::vector<float>& buffer) {
    if (!norm && !glu) return x;
    buffer.resize(M * I);
    for (int64_t m = 0; m < M; ++m) {
        float* out = buffer.data() + m * I;
        if (glu) {
            const float *gate = x + m * 2 * I, *up = gate + I;
            for (int64_t i = 0; i < I; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
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
    return buffer.data();
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t I) {
    const int64_t blocks = I / kGroup;
    QuantizedRows r{std::vector<int16_t>(M * I), std::vector<float>(M * blocks), std::vector<float>(M * blocks)};
    for (int64_t m = 0; m < M; ++m) {
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
    return r;
}

// One output row against R activation rows (R a compile-time constant, so the accumulators live
// in registers): the weight block is decoded once and used R times.
template <Format F, int R>
inline void gguf_row(const QuantizedRows& xq, int64_t m0, const uint8_t* row, int64_t blocks, float* y, int64_t O) {
    constexpr int64_t bb = F == Format::Q4_1 ? 20 : F == Format::Q4_0 ? 18 : 34;
    __m256 acc[R];
    float offset[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* blk = row + b * bb;
        const float d = half_to_float(blk);
        Codes codes;
        float mterm = 0.0f;
        if constexpr (F == Format::Q4_1) {
            codes = q4_codes(blk + 4);
            mterm = half_to_float(blk + 2);  // w = q d + m
        } else if constexpr (F == Format::Q4_0) {
            codes = q4_codes(blk + 2);
            mterm = -8.0f * d;  // w = q d - 8 d
        } else {
            codes = q8_codes(blk + 2);
        }
        for (int r = 0; r < R; ++r) {
            const int64_t xb = (m0 + r) * blocks + b;
            const __m256 dot = block_dot(codes, xq.q.data() + xb * kGroup);
            acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * xq.scale[xb]), acc[r]);
            if constexpr (F != Format::Q8_0) offset[r] += mterm * xq.sum[xb];
        }
    }
    for (int r = 0; r < R; ++r) y[(m0 + r) * O] = hsum(acc[r]) + offset[r];
}

template <Format F>
void gguf_rows(const QuantizedRows& xq, const uint8_t* w, float* y, int64_t M, int64_t I, int64_t O,
               int64_t o_begin, int64_t o_end) {
    const int64_t blocks = I / kGroup, row_bytes = blocks * (F == Format::Q4_1 ? 20 : F == Format::Q4_0 ? 18 : 34);
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint8_t* row = w + o * row_bytes;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) gguf_row<F, 4>(xq, m0, row, blocks, y + o, O);
        switch (M - m0) {
            case 3: gguf_row<F, 3>(xq, m0, row, blocks, y + o, O); break;
            case 2: gguf_row<F, 2>(xq, m0, row, blocks, y + o, O); break;
            case 1: gguf_row<F, 1>(xq, m0, row, blocks, y + o, O); break;
        }
    }
}

// Two weight rows against R activation rows (R a compile-time constant: 2R accumulators in
// registers); o1 == o0 when only one row is left.
template <int R>
inline void dense_pair(const float* x, int64_t m0, const float* w0, const float* w1, int64_t I, float* y0, float* y1,
                       int64_t O) {
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
        const __m256 v0 = _mm256_loadu_ps(w0 + i), v1 = _mm256_loadu_ps(w1 + i);
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_loadu_ps(x + (m0 + r) * I + i);
            a0[r] = _mm256_fmadd_ps(v0, xv, a0[r]);
            a1[r] = _mm256_fmadd_ps(v1, xv, a1[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        const float* xr = x + (m0 + r) * I;
        float s0 = hsum(a0[r]), s1 = hsum(a1[r]);
        for (int64_t j = i; j < I; ++j) s0 += w0[j] * xr[j], s1 += w1[j] * xr[j];
        y1[(m0 + r) * O] = s1;  // before y0: when both point at one row, y0 wins
        y0[(m0 + r) * O] = s0;
    }
}

void dense_rows(const float* x, const float* w, float* y, int64_t M, int64_t I, int64_t O, int64_t o_begin,
                int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; o += 2) {
        const int64_t o1 = o + 1 < o_end ? o + 1 : o;
        const float *w0 = w + o * I, *w1 = w + o1 * I;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) dense_pair<4>(x, m0, w0, w1, I, y + o, y + o1, O);
        switch (M - m0) {
            case 3: dense_pair<3>(x, m0, w0, w1, I, y + o, y + o1, O); break;
            case 2: dense_pair<2>(x, m0, w0, w1, I, y + o, y + o1, O); break;
            case 1: dense_pair<1>(x, m0, w0, w1, I, y + o, y + o1, O); break;
        }
    }
}

void check_x(const torch::Tensor& x, int64_t in_features, bool glu) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
                "x must be a contiguous (M, I) float32 tensor");
    const int64_t want = glu ? 2 * in_features : in_features;
    TORCH_CHECK(x.size(1) == want, "x has ", x.size(1), " features, the weight wants ", want);
}

void check_norm(const std::optional<torch::Tensor>& norm, int64_t in_features) {
    if (norm) {
        TORCH_CHECK(norm->scalar_type() == torch::kFloat32 && norm->is_contiguous() && norm->numel() == in_features,
                    "norm must be a contiguous float32 vector of in_features");
    }
}

// A grain of 16 output rows keeps threads busy on the small (192-row) products too.
constexpr int64_t kGrain = 16;

}  // namespace

torch::Tensor gguf_matmul(torch::Tensor x, torch::Tensor blocks, int64_t kind, int64_t in_features,
                          std::optional<torch::Tensor> norm, double eps, bool glu) {
    const Format f = static_cast<Format>(kind);
    check_x(x, in_features, glu);
    TORCH_CHECK(in_features % kGroup == 0, "in_features must be a multiple of 32");
    TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous(), "blocks must be contiguous uint8");
    const int64_t O = blocks.numel() / (in_features / kGroup * block_bytes(f));
    TORCH_CHECK(O * (in_features / kGroup) * block_bytes(f) == blocks.numel(), "blocks do not match in_features");
    const int64_t M = x.size(0);
    auto y = torch::empty({M, O}, x.options());
    check_norm(norm, in_features);
    std::vector<float> buffer;
    const float* rows = prepare_rows(x.data_ptr<float>(), M, in_features, norm ? norm->data_ptr<float>() : nullptr,
                                     static_cast<float>(eps), glu, buffer);
    const QuantizedRows xq = quantize_rows(rows, M, in_features);
    const uint8_t* wp = blocks.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, O, kGrain, [&](int64_t b, int64_t e) {
        if (f == Format::Q4_1) gguf_rows<Format::Q4_1>(xq, wp, yp, M, in_features, O, b, e);
        else if (f == Format::Q4_0) gguf_rows<Format::Q4_0>(xq, wp, yp, M, in_features, O, b, e);
        else gguf_rows<Format::Q8_0>(xq, wp, yp, M, in_features, O, b, e);
    });
    return y;
}

torch::Tensor dense_matmul(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> norm, double eps, bool glu) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous(),
                "w must be a contiguous (O, I) float32 tensor");
    check_x(x, w.size(1), glu);
    const int64_t M = x.size(0), I = w.size(1), O = w.size(0);
    check_norm(norm, I);
    std::vector<float> buffer;
    const float* rows = prepare_rows(x.data_ptr<float>(), M, I, norm ? norm->data_ptr<float>() : nullptr,
                                     static_cast<float>(eps), glu, buffer);
    auto y = torch::empty({M, O}, x.options());
    const float *xp = rows, *wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, O, kGrain, [&](int64_t b, int64_t e) { dense_rows(xp, wp, yp, M, I, O, b, e); });
    return y;
}


// One decode step of attention for every row and head, with the rotary embedding and the write
// of the new key and value into the cache (genkit's StaticKV layout, (B, kv_heads, capacity, d)):
// a dozen torch calls per layer otherwise, which cost more than the arithmetic at one token.
//   qkv (B, (hq + 2 hk) d): this token's projections; cos, sin (B, d): its rotation, with the
//   sign of the first half folded into sin (y = x cos + roll(x, d/2) sin); slot: where the token
//   goes; first (B): each row's first real slot (left padding before it is never looked at).
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, int64_t slot, torch::Tensor first, int64_t hq, int64_t hk) {
    const int64_t B = qkv.size(0), d = k_cache.size(3), cap = k_cache.size(2), half = d / 2;
    for (const auto* t : {&qkv, &cos, &sin, &k_cache, &v_cache})
        TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(), "decode_attention wants contiguous float32");
    TORCH_CHECK(qkv.size(1) == (hq + 2 * hk) * d && hq % hk == 0 && slot < cap && k_cache.size(0) == B &&
                    k_cache.size(1) == hk && v_cache.sizes() == k_cache.sizes() && first.numel() == B &&
                    first.scalar_type() == torch::kLong && cos.size(0) == B && cos.size(1) == d,
                "decode_attention: shapes do not fit");
    const float *x = qkv.data_ptr<float>(), *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
    float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
    const int64_t* start = first.data_ptr<int64_t>();
    std::vector<float> q(B * hq * d);
    auto rotate = [&](const float* in, const float* c, const float* s_, float* out) {
        for (int64_t i = 0; i < d; ++i) out[i] = in[i] * c[i] + in[(i + half) % d] * s_[i];
    };
    for (int64_t b = 0; b < B; ++b) {
        const float* row = x + b * (hq + 2 * hk) * d;
        for (int64_t h = 0; h < hq; ++h) rotate(row + h * d, cs + b * d, sn + b * d, q.data() + (b * hq + h) * d);
        for (int64_t g = 0; g < hk; ++g) {
            const int64_t at = ((b * hk + g) * cap + slot) * d;
            rotate(row + (hq + g) * d, cs + b * d, sn + b * d, kc + at);
            std::copy(row + (hq + hk + g) * d, row + (hq + hk + g + 1) * d, vc + at);
        }
    }
    auto out = torch::empty({B, hq * d}, qkv.options());
    float* o = out.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    at::parallel_for(0, B * hq, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> p(slot + 1);
        for (int64_t idx = begin; idx < end; ++idx) {
            const int64_t b = idx / hq, h = idx % hq, g = h / (hq / hk), t0 = start[b];
            const float* qh = q.data() + idx * d;
            const float *keys = kc + (b * hk + g) * cap * d, *values = vc + (b * hk + g) * cap * d;
            const bool wide = d % 8 == 0;  // head sizes are multiples of 8 in practice: AVX2 then
            float top = -INFINITY;
            for (int64_t t = t0; t <= slot; ++t) {
                const float* kt = keys + t * d;
                float dot = 0.0f;
                if (wide) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int64_t i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(kt + i), acc);
                    dot = hsum(acc);
                } else {
                    for (int64_t i = 0; i < d; ++i) dot += qh[i] * kt[i];
                }
                p[t] = dot * scale;
                top = std::max(top, p[t]);
            }
            float total = 0.0f;
            for (int64_t t = t0; t <= slot; ++t) total += (p[t] = std::exp(p[t] - top));
            float* oh = o + idx * d;
            std::fill(oh, oh + d, 0.0f);
            for (int64_t t = t0; t <= slot; ++t) {
                const float w = p[t] / total;
                const float* vt = values + t * d;
                if (wide) {
                    const __m256 wv = _mm256_set1_ps(w);
                    for (int64_t i = 0; i < d; i += 8)
                        _mm256_storeu_ps(oh + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vt + i), _mm256_loadu_ps(oh + i)));
                } else {
                    for (int64_t i = 0; i < d; ++i) oh[i] += w * vt[i];
                }
            }
        }
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("decode_attention", &decode_attention, "rotary embedding, KV write and attention for one new token");
    m.def("gguf_matmul", &gguf_matmul, "rms_norm(x) @ W.T for W in GGUF Q4_0 (0) / Q4_1 (1) / Q8_0 (2) blocks",
          py::arg("x"), py::arg("blocks"), py::arg("kind"), py::arg("in_features"), py::arg("norm") = py::none(),
          py::arg("eps") = 0.0, py::arg("glu") = false);
    m.def("dense_matmul", &dense_matmul, "rms_norm(x) @ W.T for a contiguous float32 W, for few rows of x",
          py::arg("x"), py::arg("w"), py::arg("norm") = py::none(), py::arg("eps") = 0.0, py::arg("glu") = false);
}
