// One decode step's rotary embedding, KV-cache write and attention, for every row and head.
// Part of kernels.cpp's one translation unit, which includes torch, AVX2 and blocks.h first and
// then, in this order: quantized.h, subblocks.h, dense.h, int_panels.h, weights.h, attention.h.
#pragma once

namespace {

// One decode step of attention for every row and head, with the rotary embedding and the write
// of the new key and value into the cache ((B, kv_heads, capacity, d) per layer):
// a dozen torch calls per layer otherwise, which cost more than the arithmetic at one token.
//   x (B, (hq + 2 hk) d): this token's projections; cs, sn (B, d): its rotation, with the sign
//   of the first half folded into sn (y = x cos + roll(x, d/2) sin); slot: where the token goes;
//   start (B): each row's first real slot (left padding before it is never looked at).
//   out (B, hq d).
//   Optional: the scores' scale (0: 1 / sqrt(d)); a sliding window (0: none) of the keys a query
//   sees, itself included (gemma's local layers); `interleaved` rotary pairs (2k, 2k + 1), the
//   layout llama.cpp stores Llama's q/k rows in, instead of (k, k + d/2), with cs and sn in the
//   same order.
struct AttentionShape {
    int64_t B, hq, hk, d, cap;
    float scale = 0.0f;
    int64_t window = 0;
    bool interleaved = false;
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

// The rotary embedding of one head: out = x cos + partner(x) sin (sign folded into sin), where
// x_i's partner is x_(i +- d/2), or x_(i xor 1) for interleaved pairs.
inline void rotate(const float* x, const float* c, const float* sn, int64_t d, bool interleaved, float* out) {
    if (interleaved) {
        for (int64_t i = 0; i < d; i += 2) {
            out[i] = x[i] * c[i] + x[i + 1] * sn[i];
            out[i + 1] = x[i + 1] * c[i + 1] + x[i] * sn[i + 1];
        }
        return;
    }
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
            for (int64_t h = 0; h < hq; ++h) rotate(row + h * d, cs + b * d, sn + b * d, d, s.interleaved, q.data() + (b * hq + h) * d);
            for (int64_t g = 0; g < hk; ++g) {
                const int64_t at = ((b * hk + g) * cap + slot) * d;
                rotate(row + (hq + g) * d, cs + b * d, sn + b * d, d, s.interleaved, kc + at);
                std::copy(row + (hq + hk + g) * d, row + (hq + hk + g + 1) * d, vc + at);
            }
        }
    });
    const float scale = s.scale > 0.0f ? s.scale : 1.0f / std::sqrt(static_cast<float>(d));
    at::parallel_for(0, B * hq, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> p(slot + 9);
        for (int64_t idx = begin; idx < end; ++idx) {
            const int64_t b = idx / hq, h = idx % hq, g = h / (hq / hk);
            const int64_t t0 = s.window > 0 ? std::max(start[b], slot + 1 - s.window) : start[b];
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
}  // namespace
