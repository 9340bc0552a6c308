// A weight as parts of any format (formats.def) and the product that picks a loop for it: the
// norm and GLU fused in, the activations prepared once per product.
// Part of kernels.cpp's one translation unit, which includes torch, AVX2 and blocks.h first and
// then, in this order: quantized.h, dense.h, weights.h, attention.h.
#pragma once

namespace {

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
    TORCH_CHECK(f && data.scalar_type() == torch::kUInt8 &&
                    (kind < kInt8Activations || format <= 2 || sub_format(format).has_value()),
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
    std::optional<QuantizedRows<int16_t>> q16;
    std::optional<QuantizedRows<int8_t>> q8;
    std::optional<SuperRows> q8k, q16k;
    std::vector<float> panels;
    const QuantizedRows<int16_t>& int16() { if (!q16) q16 = quantize_rows<int16_t>(rows, M, I); return *q16; }
    const QuantizedRows<int8_t>& int8() { if (!q8) q8 = quantize_rows<int8_t>(rows, M, I); return *q8; }
    const SuperRows& super8() { if (!q8k) q8k = quantize_super(rows, M, I, false); return *q8k; }
    const SuperRows& super16() { if (!q16k) q16k = quantize_super(rows, M, I, true); return *q16k; }
    const float* panel() { if (panels.empty()) panels = pack_panels(rows, M, I); return panels.data(); }
};

// y[:, 0 .. part.out) (=, or += with `add`) rows @ part.T; y's rows are O apart.
void part_product(Activations& a, const Part& p, float* y, int64_t O, bool add) {
    const int64_t M = a.M, I = a.I, P = p.out;
    const float* rows = a.rows;
    const int64_t format = p.kind >= kInt8Activations ? p.kind - kInt8Activations : p.kind;
    const auto sub = sub_format(format);
    const bool bytes = p.kind >= kInt8Activations;
    if (sub && M < kMinGgufPanelRows) {  // Q5_0, Q5_1, Q3_K..Q6_K: integer dot products per sub-block
        const uint8_t* wp = p.data.data_ptr<uint8_t>();
        if (*sub >= SubFormat::Q3_K) {  // k-quants: activations per super-block
            const auto& xq = bytes ? a.super8() : a.super16();
            at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
                with_sub_format(*sub, [&](auto F) {
                    constexpr SubFormat K = decltype(F)::value;
                    if constexpr (kSuper<K>) {
                        if (bytes) super_rows<K, false>(xq, wp, y, M, I, O, b, e, add);
                        else super_rows<K, true>(xq, wp, y, M, I, O, b, e, add);
                    }
                });
            });
        } else {
            auto run = [&](const auto& xq) {
                at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
                    with_sub_format(*sub, [&](auto F) {
                        if constexpr (!kSuper<decltype(F)::value>) sub_rows<decltype(F)::value>(xq, wp, y, M, I, O, b, e, add);
                    });
                });
            };
            if (bytes) run(a.int8());
            else run(a.int16());
        }
    } else if (blocks::decoded(format)) {
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
            const auto& xq = a.int8();
            at::parallel_for(0, P, kGrain, [&](int64_t b, int64_t e) {
                with_format(f, [&](auto F) { gguf_rows<decltype(F)::value>(xq, wp, y, M, I, O, b, e, add); });
            });
        } else {
            const auto& xq = a.int16();
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
    Activations a{prepare_rows(x, M, w.in, norm, eps, glu, buffer), M, w.in, {}, {}, {}, {}};
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
}  // namespace
