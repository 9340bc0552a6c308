// A weight as parts of any format (formats.def) and the product that picks a loop for it: the
// norm and GLU fused in, the activations prepared once per product.
// Part of kernels.cpp's one translation unit, which includes torch, AVX2 and blocks.h first and
// then, in this order: quantized.h, subblocks.h, dense.h, int_panels.h, weights.h, attention.h.
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
// format's code; an integer format's code (Q4_0..Q8_0, Q5_0, Q5_1, Q3_K..Q6_K) plus
// kInt8Activations multiplies the same blocks with byte activations.
constexpr int64_t kF32 = 3, kBF16 = 4, kInt8Activations = 32;
// The block format of a kind, with or without byte activations.
int64_t format_of(int64_t kind) { return kind >= kInt8Activations ? kind - kInt8Activations : kind; }

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
    const int64_t format = format_of(kind);
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

// How a part's rows are multiplied by M activation rows.
enum class Route {
    SubRows,      // Q5_0, Q5_1 below 8 rows: integer dot products per 32 (int16 or bytes)
    SuperRows,    // the k-quants below 8 rows: integer dot products per 256 (16-bit planes or bytes)
    Decoded,      // Q2_K, F16: rows decoded to floats (panels from 16 rows)
    BlockRows,    // Q4_0, Q4_1, Q8_0 below 8 rows: integer dot products per 32
    IntPanels,    // every integer format from 8 rows: unpacked weight tiles, integer panels (int_panels.h)
    DenseRows,    // F32 / BF16, up to 8 rows: rows streamed
    DensePanels,  // F32 / BF16, 9..256 rows
    Torch,        // F32 / BF16, more rows: torch's product
};

// A product's activation rows in the forms the loops take, each made at most once per product,
// on first need. A DecodeStack keeps one for all its products, step after step: the buffers keep
// their capacity, so a decode step allocates nothing.
class Activations {
  public:
    const float* rows = nullptr;
    int64_t M = 0, I = 0;
    std::vector<Route> routes;  // per part of the weight being multiplied
    std::vector<int64_t> starts;  // each part's first output column

    // The rows of a new product: prepare_rows(x) (normed, or the GLU of x's halves), no form made yet.
    void start(const float* x, int64_t m, int64_t in, const float* norm, float eps, bool glu) {
        rows = prepare_rows(x, m, in, norm, eps, glu, normed_);
        M = m;
        I = in;
        made_ = 0;
        routes.clear();
        starts.clear();
    }
    const QuantizedRows<int16_t>& int16() { return make(kInt16, q16_, [&] { quantize_rows(rows, M, I, q16_); }); }
    const QuantizedRows<int8_t>& int8() { return make(kInt8, q8_, [&] { quantize_rows(rows, M, I, q8_); }); }
    const SuperRows& super8() { return make(kSuper8, q8k_, [&] { quantize_super(rows, M, I, false, q8k_); }); }
    const SuperRows& super16() { return make(kSuper16, q16k_, [&] { quantize_super(rows, M, I, true, q16k_); }); }
    const float* panels() { return make(kPanels, panels_, [&] { pack_panels(rows, M, I, panels_); }).data(); }
    const IntPanels& int_panels() { return make(kIntPanels, int_panels_, [&] { pack_quant_panels(rows, M, I, int_panels_); }); }
    const BytePanels& byte_panels() {
        return make(kBytePanels, byte_panels_, [&] { pack_quant_panels(rows, M, I, byte_panels_); });
    }

  private:
    enum Form { kInt16 = 1, kInt8 = 2, kSuper8 = 4, kSuper16 = 8, kPanels = 16, kIntPanels = 32, kBytePanels = 64 };
    // Worker threads only read forms `prepare` made before they started: made_ is written here
    // only while a form is filled, on the product's own thread.
    template <typename T, typename Fill>
    const T& make(Form form, const T& buffer, Fill&& fill) {
        if (!(made_ & form)) {
            fill();
            made_ |= form;
        }
        return buffer;
    }
    int made_ = 0;
    std::vector<float> normed_;
    QuantizedRows<int16_t> q16_;
    QuantizedRows<int8_t> q8_;
    SuperRows q8k_, q16k_;
    std::vector<float> panels_;
    IntPanels int_panels_;
    BytePanels byte_panels_;
};

int64_t format_of(const Part& p) { return format_of(p.kind); }
bool bytes_of(const Part& p) { return p.kind >= kInt8Activations; }

Route route(const Part& p, int64_t M) {
    const int64_t format = format_of(p);
    const auto sub = sub_format(format);
    if (int_panel_format(format) && M >= kMinIntPanelRows) return Route::IntPanels;
    if (sub) return *sub >= SubFormat::Q3_K ? Route::SuperRows : Route::SubRows;
    if (blocks::decoded(format)) return Route::Decoded;
    if (format < kF32) return Route::BlockRows;
    if (M <= kMaxStreamRows) return Route::DenseRows;
    return M <= kMaxPanelRows ? Route::DensePanels : Route::Torch;
}

// Makes the activation form the route reads (before any worker thread starts: the forms are
// built lazily, once per product, and shared by every part).
void prepare(Activations& a, const Part& p, Route r) {
    const bool bytes = bytes_of(p);
    switch (r) {
        case Route::SubRows: case Route::BlockRows: bytes ? (void)a.int8() : (void)a.int16(); break;
        case Route::SuperRows: bytes ? (void)a.super8() : (void)a.super16(); break;
        case Route::Decoded: if (a.M >= kMinDecodedPanelRows) a.panels(); break;
        case Route::IntPanels: bytes && kHasBytePanels ? (void)a.byte_panels() : (void)a.int_panels(); break;
        case Route::DensePanels: a.panels(); break;
        default: break;
    }
}

// y[:, b .. e) (=, or += with `add`) of rows @ part.T, for output rows b..e of the part; y's rows
// are O apart. Runs on one thread; `prepare` made the activation form.
void part_rows(Activations& a, const Part& p, Route r, float* y, int64_t O, bool add, int64_t b, int64_t e) {
    const int64_t M = a.M, I = a.I, format = format_of(p);
    const bool bytes = bytes_of(p);
    const float* rows = a.rows;
    switch (r) {
        case Route::SubRows:
            with_sub_format(*sub_format(format), [&](auto F) {
                constexpr SubFormat K = decltype(F)::value;
                if constexpr (!kSuper<K>) {
                    if (bytes) sub_rows<K>(a.int8(), p.data.data_ptr<uint8_t>(), y, M, I, O, b, e, add);
                    else sub_rows<K>(a.int16(), p.data.data_ptr<uint8_t>(), y, M, I, O, b, e, add);
                }
            });
            break;
        case Route::SuperRows:
            with_sub_format(*sub_format(format), [&](auto F) {
                constexpr SubFormat K = decltype(F)::value;
                if constexpr (kSuper<K>) {
                    if (bytes) super_rows<K, false>(a.super8(), p.data.data_ptr<uint8_t>(), y, M, I, O, b, e, add);
                    else super_rows<K, true>(a.super16(), p.data.data_ptr<uint8_t>(), y, M, I, O, b, e, add);
                }
            });
            break;
        case Route::Decoded:
            blocks::with_decoded(format, [&](auto K) {
                if (M >= kMinDecodedPanelRows) decoded_panel_block<decltype(K)::value>(a.panels(), p.data.data_ptr<uint8_t>(), y, M, I, O, b, e, add);
                else decoded_rows<decltype(K)::value>(rows, p.data.data_ptr<uint8_t>(), y, M, I, O, b, e, add);
            });
            break;
        case Route::BlockRows:
            with_format(static_cast<Format>(format), [&](auto F) {
                if (bytes) gguf_rows<decltype(F)::value>(a.int8(), p.data.data_ptr<uint8_t>(), y, M, I, O, b, e, add);
                else gguf_rows<decltype(F)::value>(a.int16(), p.data.data_ptr<uint8_t>(), y, M, I, O, b, e, add);
            });
            break;
        case Route::IntPanels: {
            const FormatInfo* f = find_format(format);
            const int64_t row_bytes = I / f->weights * f->bytes;
            const uint8_t* w = p.data.data_ptr<uint8_t>();
            if (bytes && kHasBytePanels) quant_panel_block(format, row_bytes, a.byte_panels(), w, y, M, I, O, b, e, add);
            else quant_panel_block(format, row_bytes, a.int_panels(), w, y, M, I, O, b, e, add);
            break;
        }
        case Route::DenseRows:
            if (p.kind == kF32) dense_rows(rows, p.data.data_ptr<float>(), y, M, I, O, b, e, add);
            else dense_rows(rows, reinterpret_cast<const uint16_t*>(p.data.data_ptr<at::BFloat16>()), y, M, I, O, b, e, add);
            break;
        case Route::DensePanels:
            if (p.kind == kF32) panel_block(a.panels(), p.data.data_ptr<float>(), y, M, I, O, b, e, add);
            else panel_block(a.panels(), reinterpret_cast<const uint16_t*>(p.data.data_ptr<at::BFloat16>()), y, M, I, O, b, e, add);
            break;
        case Route::Torch:
            break;  // whole parts, in product()
    }
}

// Many rows of a dense part (a large batch): torch's product, then the same y = / += as above.
void torch_part(const Activations& a, const Part& p, float* y, int64_t O, bool add) {
    auto xt = torch::from_blob(const_cast<float*>(a.rows), {a.M, a.I}, torch::kFloat32);
    auto result = p.kind == kF32 ? torch::mm(xt, p.data.t()) : torch::mm(xt.to(torch::kBFloat16), p.data.t()).to(torch::kFloat32);
    auto out = torch::from_blob(y, {a.M, O}, torch::kFloat32).narrow(1, 0, p.out);
    if (add) out.add_(result);
    else out.copy_(result);
}

// y (M, w.out) = or += prepare_rows(x) @ W.T, for x (M, w.in) or (M, 2 w.in) with `glu`, with
// `a` as the workspace. Every part's rows go through one parallel region: a fused q/k/v of three
// formats wakes the workers once, not three times (each wake-up costs tens of microseconds with
// sleeping workers).
void product(const float* x, int64_t M, const Weight& w, const float* norm, float eps, bool glu, float* y,
             bool add, Activations& a) {
    a.start(x, M, w.in, norm, eps, glu);
    int64_t column = 0;
    for (const Part& p : w.parts) {
        a.routes.push_back(route(p, M));
        prepare(a, p, a.routes.back());
        a.starts.push_back(column);
        if (a.routes.back() == Route::Torch) torch_part(a, p, y + column, w.out, add);
        column += p.out;
    }
    at::parallel_for(0, w.out, kGrain, [&](int64_t b, int64_t e) {
        for (size_t i = 0; i < w.parts.size(); ++i) {
            const int64_t first = a.starts[i], lo = std::max(b, first), hi = std::min(e, first + w.parts[i].out);
            if (lo < hi && a.routes[i] != Route::Torch)
                part_rows(a, w.parts[i], a.routes[i], y + first, w.out, add, lo - first, hi - first);
        }
    });
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
    Activations a;
    product(x.data_ptr<float>(), x.size(0), w, norm_ptr(norm, w.in), static_cast<float>(eps), glu, y.data_ptr<float>(),
            false, a);
    return y;
}
}  // namespace
