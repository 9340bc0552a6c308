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
//   Q5_0, Q5_1, Q3_K .. Q6_K: integer dot products per 32-weight sub-block (subblocks.h)
//   every integer format from 8 activation rows: integer panels (int_panels.h)
//   F16, Q2_K: rows decoded to floats (blocks.h), then the float loops
// (formats.def lists every format with its code and block size, for this file and kernels.py).
// In a Q4 block, byte j holds weight j in its low nibble and weight j + 16 in its high one.
//
// One translation unit in parts: quantized.h (integer products on Q4/Q8 blocks), subblocks.h
// (integer products on Q5 and k-quant sub-blocks), dense.h (float rows and panels), int_panels.h
// (integer panels for many activation rows), weights.h (a weight's parts and the product that
// picks the loop), attention.h (rotary + KV write + attention); this file holds the whole-step
// DecodeStack and the bindings.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "quantized.h"
#include "subblocks.h"
#include "dense.h"
#include "int_panels.h"
#include "weights.h"
#include "attention.h"

namespace {

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

    // What the other architectures add to a layer: a bias on q/k/v ((hq + 2 hk) d; qwen2), an RMS
    // norm over each head of q and of k (d each, after the bias, before the rotary embedding;
    // qwen3, gemma3), RMS norms on the attention and MLP outputs before they join the residual
    // stream (hidden each; gemma), a sliding window (0: none) and which rotary table the layer
    // uses (gemma's local and global layers).
    void add_extras(int64_t layer, std::optional<torch::Tensor> qkv_bias, std::optional<torch::Tensor> q_norm,
                    std::optional<torch::Tensor> k_norm, std::optional<torch::Tensor> post_attn_norm,
                    std::optional<torch::Tensor> post_ffn_norm, int64_t window, int64_t table) {
        TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "no layer ", layer);
        auto check = [](const std::optional<torch::Tensor>& t, int64_t n) {
            TORCH_CHECK(!t || (t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == n),
                        "extras must be contiguous float32 vectors of the layer's sizes");
        };
        check(qkv_bias, (hq_ + 2 * hk_) * d_);
        check(q_norm, d_);
        check(k_norm, d_);
        const int64_t hidden = layers_[layer].attn_norm.numel();
        check(post_attn_norm, hidden);
        check(post_ffn_norm, hidden);
        TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q and k norms come together");
        TORCH_CHECK(window >= 0 && table >= 0, "window and table are counts");
        Layer& L = layers_[layer];
        if (qkv_bias) L.qkv_bias = *qkv_bias;
        if (q_norm) L.q_norm = *q_norm, L.k_norm = *k_norm;
        if (post_attn_norm) L.post_attn_norm = *post_attn_norm;
        if (post_ffn_norm) L.post_ffn_norm = *post_ffn_norm;
        L.window = window;
        L.table = table;
    }

    // The attention scores' scale (0: 1 / sqrt(head_dim)), the MLP's activation: gelu (tanh
    // approximation, gemma) instead of silu, and interleaved rotary pairs (attention.h).
    void set_options(double attention_scale, bool gelu, bool interleaved) {
        scale_ = static_cast<float>(attention_scale);
        gelu_ = gelu;
        interleaved_ = interleaved;
    }

    // x (B, hidden): the new token's embeddings, updated in place to the last layer's output.
    // cos, sin: (B, d), or (tables, B, d) where layers use different rotary tables.
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
        const bool tables = cos.dim() == 3;
        for (int64_t t = 0; t < (tables ? cos.size(0) : 1); ++t)
            check_rotation(tables ? cos[t] : cos, tables ? sin[t] : sin, first, B, d_);
        for (const Layer& L : layers_) TORCH_CHECK(L.table < (tables ? cos.size(0) : 1), "a layer's rotary table is missing");
        AttentionShape s{B, hq_, hk_, d_, keys[0].size(2), scale_, 0, interleaved_};
        for (int64_t i = 0; i < n; ++i) check_cache(keys[i], values[i], s, slot);
        TORCH_CHECK(!states || (states->scalar_type() == torch::kFloat32 && states->is_contiguous() &&
                                states->numel() == n * B * hidden),
                    "states must be contiguous float32 (n_layers, B, hidden)");
        float* saved = states ? states->data_ptr<float>() : nullptr;
        const std::lock_guard<std::mutex> one_step_at_a_time(busy_);  // the scratch below is the stack's
        auto& [qkv, attn, gate_up, out, inner, acts] = scratch_;
        qkv.resize(B * (hq_ + 2 * hk_) * d_);
        attn.resize(B * hq_ * d_);
        out.resize(B * hidden);
        float* h = x.data_ptr<float>();
        const int64_t per_table = B * d_;
        for (int64_t i = 0; i < n; ++i) {
            const Layer& L = layers_[i];
            if (saved) std::copy(h, h + B * hidden, saved + i * B * hidden);
            product(h, B, L.qkv, L.attn_norm.data_ptr<float>(), eps_, false, qkv.data(), false, acts);
            if (L.qkv_bias.defined() || L.q_norm.defined()) finish_qkv(L, B, qkv.data());
            s.window = L.window;
            attention(s, qkv.data(), cos.data_ptr<float>() + L.table * per_table,
                      sin.data_ptr<float>() + L.table * per_table, keys[i].data_ptr<float>(),
                      values[i].data_ptr<float>(), slot, first.data_ptr<int64_t>(), attn.data());
            add_output(attn.data(), B, L.o, L.post_attn_norm, false, out.data(), h, hidden);
            gate_up.resize(B * L.gate_up.out);
            product(h, B, L.gate_up, L.ffn_norm.data_ptr<float>(), eps_, false, gate_up.data(), false, acts);
            if (gelu_) {  // gelu(gate) * up here; the kernels' own GLU is silu's
                const int64_t I = L.gate_up.out / 2;
                inner.resize(B * I);
                for (int64_t b = 0; b < B; ++b)
                    gelu_glu_row(gate_up.data() + b * 2 * I, gate_up.data() + b * 2 * I + I, inner.data() + b * I, I);
                add_output(inner.data(), B, L.down, L.post_ffn_norm, false, out.data(), h, hidden);
            } else {
                add_output(gate_up.data(), B, L.down, L.post_ffn_norm, true, out.data(), h, hidden);
            }
        }
    }

  private:
    // A step's intermediate rows, kept from step to step (resized to the batch, never freed
    // between steps): q/k/v projections, attention output, gate/up, a product before its post
    // norm, gelu's GLU, and the products' activation forms.
    struct Scratch {
        std::vector<float> qkv, attn, gate_up, out, inner;
        Activations acts;
    };

    struct Layer {
        torch::Tensor attn_norm, ffn_norm;
        Weight qkv, o, gate_up, down;
        torch::Tensor qkv_bias, q_norm, k_norm;  // undefined where the architecture has none
        torch::Tensor post_attn_norm, post_ffn_norm;
        int64_t window = 0, table = 0;
    };

    // h += the product of x with w, RMS-normed by `post_norm` first where the layer has one (the
    // product then lands in `out`, B rows of `hidden`, before it is added).
    void add_output(const float* x, int64_t B, const Weight& w, const torch::Tensor& post_norm, bool glu, float* out,
                    float* h, int64_t hidden) {
        if (!post_norm.defined()) {
            product(x, B, w, nullptr, 0.0f, glu, h, true, scratch_.acts);
            return;
        }
        product(x, B, w, nullptr, 0.0f, glu, out, false, scratch_.acts);
        const float* weight = post_norm.data_ptr<float>();
        for (int64_t b = 0; b < B; ++b) {
            const float* row = out + b * hidden;
            const float factor = inv_rms(row, hidden, eps_);
            for (int64_t i = 0; i < hidden; ++i) h[b * hidden + i] += row[i] * factor * weight[i];
        }
    }

    // The bias, then each q and k head RMS-normed (as torch's rms_norm: mean of squares in
    // double, times the weight), on B rows of (hq + 2 hk) d projections.
    void finish_qkv(const Layer& L, int64_t B, float* qkv) const {
        const int64_t width = (hq_ + 2 * hk_) * d_;
        for (int64_t b = 0; b < B; ++b) {
            float* row = qkv + b * width;
            if (L.qkv_bias.defined()) {
                const float* bias = L.qkv_bias.data_ptr<float>();
                for (int64_t i = 0; i < width; ++i) row[i] += bias[i];
            }
            if (!L.q_norm.defined()) continue;
            for (int64_t h = 0; h < hq_ + hk_; ++h) {
                float* v = row + h * d_;
                const float* w = (h < hq_ ? L.q_norm : L.k_norm).data_ptr<float>();
                const float factor = inv_rms(v, d_, eps_);
                for (int64_t i = 0; i < d_; ++i) v[i] = v[i] * factor * w[i];
            }
        }
    }
    int64_t hq_, hk_, d_;
    float eps_, scale_ = 0.0f;
    bool gelu_ = false, interleaved_ = false;
    Scratch scratch_;
    std::mutex busy_;
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
                               torch::Tensor v_cache, int64_t slot, torch::Tensor first, int64_t hq, int64_t hk,
                               bool interleaved) {
    const int64_t B = qkv.size(0), d = k_cache.size(3);
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous() && hq % hk == 0 &&
                    qkv.size(1) == (hq + 2 * hk) * d,
                "decode_attention: qkv must be contiguous float32 (B, (hq + 2 hk) d)");
    const AttentionShape s{B, hq, hk, d, k_cache.size(2), 0.0f, 0, interleaved};
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
          py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot"),
          py::arg("first"), py::arg("hq"), py::arg("hk"), py::arg("interleaved") = false,
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
        .def("add_extras", &DecodeStack::add_extras, py::arg("layer"), py::arg("qkv_bias") = py::none(),
             py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(), py::arg("post_attn_norm") = py::none(),
             py::arg("post_ffn_norm") = py::none(), py::arg("window") = 0, py::arg("table") = 0)
        .def("set_options", &DecodeStack::set_options, py::arg("attention_scale"), py::arg("gelu"),
             py::arg("interleaved") = false)
        .def("forward", &DecodeStack::forward, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("keys"),
             py::arg("values"), py::arg("slot"), py::arg("first"), py::arg("states") = py::none(),
             py::call_guard<py::gil_scoped_release>());
}
