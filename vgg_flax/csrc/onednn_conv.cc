// 2-D convolutions for XLA:CPU through oneDNN, as XLA FFI custom calls.
//
// Why: XLA:CPU runs convolutions on Eigen's f32 kernels and has no bf16 convolution at all (it
// converts bf16 operands to f32). oneDNN is the library torch uses for the same convolutions on
// CPU; calling it from the compiled VGG program puts both frameworks on the same kernels.
// README, "Performance", has the measurements.
//
// Three handlers, one per direction, for NHWC activations and HWIO kernels (Flax's layouts),
// float32 or bfloat16 activations (bf16 accumulates in f32 inside oneDNN, as torch's autocast
// does). The kernel (and bias) may be float32 under bf16 activations: the reorder into oneDNN's
// blocked layout that every call makes anyway rounds it, so a bf16 model with f32 parameters
// pays no separate cast, and its weight gradient comes back in f32 (oneDNN accumulates it in
// f32 and the reorder back writes the caller's dtype).
//   vgg_flax_conv_fwd          y  = conv(x, w)
//   vgg_flax_conv_bwd_data     dx = conv_backward_data(dy, w)
//   vgg_flax_conv_bwd_weights  dw = conv_backward_weights(x, dy)
// and, with the bias folded in (oneDNN adds it while writing y, and sums dy into db while it
// reads dy for dw, instead of two more passes over the activations in XLA):
//   vgg_flax_conv_bias_fwd             y = conv(x, w) + b
//   vgg_flax_conv_bwd_weights_bias     dw, db = conv_backward_weights(x, dy), sum(dy)
// Attributes: strides[2], padding[4] = (top, bottom, left, right), dilation[2] (1 = dense);
// the forward calls also take relu (0/1): ReLU applied as oneDNN writes y (a post-op), which
// saves XLA a pass over every activation; NaN and infinities come out as XLA's max(y, 0) gives
// them (see Build).
// Activations are NHWC at the interface; where oneDNN's NHWC backward kernels are the slow ones
// (no AVX-512), the backward calls reorder them into its blocked layout inside (BackwardLayout).
// Primitives are built once per shape and kept; the kernel is reordered to oneDNN's preferred
// blocked layout on every call (weights change every training step; it costs ~1% of the conv).
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum class Kind { kFwd, kBwdData, kBwdWeights };

struct Geometry {
  int64_t n, h, w, c;     // input
  int64_t kh, kw, o;      // kernel
  int64_t oh, ow;         // output
  int64_t stride[2], pad[4], dilation[2];
  memory::data_type dt;                 // activations, and what the convolution computes in
  memory::data_type wdt;                // the caller's kernel (and kernel gradient)
  bool relu = false;                    // forward only
  bool blocked = false;                 // backward: activations reordered (BackwardLayout)
  bool bias = false;
  memory::data_type bias_dt = memory::data_type::undef;
};

// A fused ReLU keeps NaN (see Build) at the price of an exp per output: measured on VGG-16's
// forward convolutions at batch 8 (one thread, CPU time), +0.4% (f32) and +2.4% (bf16) of a 3x3
// convolution on 256 channels, +3.6% and +6.8% on 64, but +60-90% on conv1_1's 3 (27
// multiply-adds per output). With at most kScanInputsMaxMacs, the input is small next to the
// output and is scanned instead (~2% of conv1_1): when no partial sum can be anything but
// finite, oneDNN's plain ReLU post-op, max(y, 0), is exact and runs.
constexpr int64_t kScanInputsMaxMacs = 64;

struct Cached {
  dnnl::primitive conv;
  memory::desc src, weights, dst;       // what the convolution runs on
  memory::desc user_src, user_dst;      // NHWC
  bool reorder_src = false, reorder_dst = false;
  dnnl::primitive src_reorder;          // x -> src (fwd, bwd weights); dx <- src (bwd data)
  dnnl::primitive dst_reorder;          // y <- dst (fwd); dy -> dst (bwd data, bwd weights)
  memory::desc user_weights;            // HWIO
  memory::desc scratchpad;
  bool has_finite_relu = false;         // forward + ReLU with few multiply-adds per output:
  dnnl::primitive finite_relu_conv;     // the same with max(y, 0), for finite partial sums
  memory::desc finite_relu_scratchpad;
  memory::desc bias;                    // b or db, when the convolution has one
  bool reorder_weights = false;
  dnnl::primitive weights_reorder;      // HWIO -> blocked (fwd, bwd data) or back (bwd weights)
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::string Key(Kind kind, const Geometry& g) {
  std::string key = std::to_string(static_cast<int>(kind)) + ":" +
                    std::to_string(static_cast<int>(g.dt)) + ":" +
                    std::to_string(static_cast<int>(g.wdt)) + (g.relu ? ":relu:" : ":") +
                    (g.blocked ? "blocked:" : "") +
                    (g.bias ? std::to_string(static_cast<int>(g.bias_dt)) : "-");
  for (int64_t v : {g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.oh, g.ow, g.stride[0], g.stride[1],
                    g.pad[0], g.pad[1], g.pad[2], g.pad[3], g.dilation[0], g.dilation[1]}) {
    key += "," + std::to_string(v);
  }
  return key;
}

std::unique_ptr<Cached> Build(Kind kind, const Geometry& g) {
  auto& eng = Engine();
  const memory::dims src_dims = {g.n, g.c, g.h, g.w};
  const memory::dims wei_dims = {g.o, g.c, g.kh, g.kw};
  const memory::dims dst_dims = {g.n, g.o, g.oh, g.ow};
  const memory::dims strides = {g.stride[0], g.stride[1]};
  // oneDNN counts dilation from 0 (0 = dense); XLA from 1.
  const memory::dims dilates = {g.dilation[0] - 1, g.dilation[1] - 1};
  const memory::dims pad_l = {g.pad[0], g.pad[2]};
  const memory::dims pad_r = {g.pad[1], g.pad[3]};
  using tag = memory::format_tag;
  memory::desc user_src(src_dims, g.dt, tag::nhwc);
  memory::desc user_dst(dst_dims, g.dt, tag::nhwc);
  memory::desc src = g.blocked ? memory::desc(src_dims, g.dt, tag::any) : user_src;
  memory::desc dst = g.blocked ? memory::desc(dst_dims, g.dt, tag::any) : user_dst;
  memory::desc wei_any(wei_dims, g.dt, tag::any);
  memory::desc user_wei(wei_dims, g.wdt, tag::hwio);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto c = std::make_unique<Cached>();
  c->user_src = user_src;
  c->user_dst = user_dst;
  c->user_weights = user_wei;
  if (g.bias) c->bias = memory::desc({g.o}, g.bias_dt, tag::x);
  auto forward = [&](const dnnl::post_ops& ops) {
    dnnl::primitive_attr fwd_attr = attr;
    fwd_attr.set_post_ops(ops);
    return g.bias ? dnnl::convolution_forward::primitive_desc(
                        eng, dnnl::prop_kind::forward_training,
                        dnnl::algorithm::convolution_direct, src, wei_any, c->bias, dst,
                        strides, dilates, pad_l, pad_r, fwd_attr)
                  : dnnl::convolution_forward::primitive_desc(
                        eng, dnnl::prop_kind::forward_training,
                        dnnl::algorithm::convolution_direct, src, wei_any, dst, strides,
                        dilates, pad_l, pad_r, fwd_attr);
  };
  dnnl::post_ops relu_ops, max_ops;
  if (kind == Kind::kFwd && g.relu) {
    // A ReLU that keeps NaN, as XLA's max(y, 0) and torch's relu do. oneDNN's eltwise_relu is a
    // vmaxps whose operand order returns 0 for NaN (and its gemm-based kernels turn -inf into
    // NaN). elu with alpha 0 is y > 0 ? y : 0 * (exp(y) - 1), a compare and a blend: NaN stays
    // NaN, +inf stays, -inf and every y <= 0 give -0, which 1 * y + 0 makes +0.
    relu_ops.append_eltwise(dnnl::algorithm::eltwise_elu, 0.f, 0.f);
    relu_ops.append_eltwise(dnnl::algorithm::eltwise_linear, 1.f, 0.f);
    max_ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  }
  auto fwd = forward(relu_ops);
  if (kind == Kind::kFwd) {
    c->weights = fwd.weights_desc();
    c->src = fwd.src_desc();
    c->dst = fwd.dst_desc();
    c->scratchpad = fwd.scratchpad_desc();
    c->conv = dnnl::convolution_forward(fwd);
    if (g.relu && g.c * g.kh * g.kw <= kScanInputsMaxMacs) {
      auto max_fwd = forward(max_ops);
      c->has_finite_relu = max_fwd.weights_desc() == c->weights &&  // one set of reorders
                           max_fwd.src_desc() == c->src && max_fwd.dst_desc() == c->dst;
      c->finite_relu_conv = dnnl::convolution_forward(max_fwd);
      c->finite_relu_scratchpad = max_fwd.scratchpad_desc();
    }
  } else if (kind == Kind::kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src, wei_any, dst, strides, dilates, pad_l,
        pad_r, fwd, attr);
    c->weights = bwd.weights_desc();
    c->src = bwd.diff_src_desc();
    c->dst = bwd.diff_dst_desc();
    c->scratchpad = bwd.scratchpad_desc();
    c->conv = dnnl::convolution_backward_data(bwd);
  } else {
    // The weight gradient is accumulated and returned in f32 by oneDNN, then rounded once into
    // the caller's dtype by the reorder.
    memory::desc dwei_any(wei_dims, memory::data_type::f32, tag::any);
    auto bwd = g.bias ? dnnl::convolution_backward_weights::primitive_desc(
                            eng, dnnl::algorithm::convolution_direct, src, dwei_any, c->bias,
                            dst, strides, dilates, pad_l, pad_r, fwd, attr)
                      : dnnl::convolution_backward_weights::primitive_desc(
                            eng, dnnl::algorithm::convolution_direct, src, dwei_any, dst,
                            strides, dilates, pad_l, pad_r, fwd, attr);
    c->weights = bwd.diff_weights_desc();
    c->src = bwd.src_desc();
    c->dst = bwd.diff_dst_desc();
    c->scratchpad = bwd.scratchpad_desc();
    c->conv = dnnl::convolution_backward_weights(bwd);
  }
  // Activations: the fwd and bwd-weights read src, bwd data writes it; fwd writes dst, the
  // backward passes read it.
  c->reorder_src = c->src != c->user_src;
  if (c->reorder_src) {
    c->src_reorder = kind == Kind::kBwdData
        ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->src, eng, c->user_src))
        : dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->user_src, eng, c->src));
  }
  c->reorder_dst = c->dst != c->user_dst;
  if (c->reorder_dst) {
    c->dst_reorder = kind == Kind::kFwd
        ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->dst, eng, c->user_dst))
        : dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->user_dst, eng, c->dst));
  }
  c->reorder_weights = c->weights != c->user_weights;
  if (c->reorder_weights) {
    if (kind == Kind::kBwdWeights) {
      c->weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          eng, c->weights, eng, c->user_weights));
    } else {
      c->weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          eng, c->user_weights, eng, c->weights));
    }
  }
  return c;
}

const Cached& Get(Kind kind, const Geometry& g) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<std::string, std::unique_ptr<Cached>>();
  const std::string key = Key(kind, g);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it == cache->end()) it = cache->emplace(key, Build(kind, g)).first;
  return *it->second;
}

// The largest |v| of n float32 or bfloat16 values, infinity if one is not finite (or NaN).
// Read as integers: the magnitude bits order like the values, and NaN is above infinity.
float MaxAbs(const void* data, size_t n, memory::data_type dt) {
  uint32_t m = 0;
  if (dt == memory::data_type::f32) {
    for (size_t i = 0; i < n; ++i) {
      uint32_t v;
      std::memcpy(&v, static_cast<const char*>(data) + 4 * i, 4);
      m = std::max(m, v & 0x7fffffffu);
    }
  } else {
    uint16_t h = 0;
    for (size_t i = 0; i < n; ++i) {
      uint16_t v;
      std::memcpy(&v, static_cast<const char*>(data) + 2 * i, 2);
      h = std::max<uint16_t>(h, v & 0x7fff);
    }
    m = uint32_t(h) << 16;
  }
  if (m >= 0x7f800000u) return std::numeric_limits<float>::infinity();
  float f;
  std::memcpy(&f, &m, 4);
  return f;
}

// Whether every partial sum of conv(x, w) + b is finite: all values finite and
// |x|max |w|max (taps) + |b|max within half of FLT_MAX (headroom for rounding).
bool PartialSumsFinite(const Geometry& g, const ffi::AnyBuffer& x, const ffi::AnyBuffer& w,
                       const ffi::AnyBuffer* bias) {
  const double taps = static_cast<double>(g.c * g.kh * g.kw);
  double bound = taps * MaxAbs(x.untyped_data(), x.element_count(), g.dt) *
                 MaxAbs(w.untyped_data(), w.element_count(), g.wdt);
  if (bias != nullptr) bound += MaxAbs(bias->untyped_data(), bias->element_count(), g.bias_dt);
  return bound <= 0.5 * FLT_MAX;  // false for inf and for NaN (0 * inf)
}

// The activations' layout in the backward passes. oneDNN's NHWC backward kernels are its
// slower ones on CPUs without AVX-512: there the backward calls reorder dy (and x) into the
// layout oneDNN picks for the shape (nChw8c on AVX2) and dx back, as torch's NCHW path does.
// Measured on an AVX2-only EPYC, VGG-16 batch 8 fp32: the training step's convolutions take
// 21-26% less time, the step 1.14 -> 1.57 images/s (docs/performance.md). The forward stays NHWC: blocked,
// its reorders cost more than they save (the same measurement). With AVX-512, NHWC runs at
// parity with torch (measured there) and stays. VGG_FLAX_ONEDNN_LAYOUT=nhwc|blocked overrides
// (read once); vgg_flax.onednn.backward_layout() reports.
enum Layout : int { kNhwc = 0, kBlocked = 1 };

int DefaultLayout() {
  const char* v = std::getenv("VGG_FLAX_ONEDNN_LAYOUT");
  const std::string mode = v ? v : "";
  if (mode == "nhwc") return kNhwc;
  if (mode == "blocked") return kBlocked;
  const int isa = static_cast<int>(dnnl::get_effective_cpu_isa());
  const int avx512 = static_cast<int>(dnnl::cpu_isa::avx512_core);
  return (isa & avx512) == avx512 ? kNhwc : kBlocked;
}

std::atomic<int>& BackwardLayout() {
  static std::atomic<int> layout(DefaultLayout());
  return layout;
}

// A 64-byte aligned buffer for one call: activations are large (100 MB for VGG-16's conv1_2 at
// batch 8) and are not kept between calls.
struct Scratch {
  std::unique_ptr<char[]> bytes;
  void* Get(size_t n) {
    bytes.reset(new char[n + 64]);
    const auto p = reinterpret_cast<std::uintptr_t>(bytes.get());
    return bytes.get() + ((64 - p % 64) % 64);
  }
};

// Per-thread buffers: XLA may run two convolutions at once on different threads, never two on
// one thread.
struct Buffers {
  std::vector<char> weights, scratchpad;
};
thread_local Buffers buffers;

// A buffer of at least n bytes starting on a 64-byte boundary (a cache line; oneDNN's kernels
// expect their scratchpad and blocked weights aligned), grown as needed and kept.
void* Grow(std::vector<char>& v, size_t n) {
  constexpr size_t kAlign = 64;
  if (v.size() < n + kAlign) v.resize(n + kAlign);
  const auto p = reinterpret_cast<std::uintptr_t>(v.data());
  return v.data() + ((kAlign - p % kAlign) % kAlign);
}

ffi::Error Fail(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vgg_flax oneDNN convolution: " + what);
}

ffi::Error Run(Kind kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer out,
               ffi::Span<const int64_t> stride, ffi::Span<const int64_t> pad,
               ffi::Span<const int64_t> dilation, ffi::AnyBuffer* bias = nullptr,
               bool relu = false) {
  // a, b, out are (x, w, y), (dy, w, dx) or (x, dy, dw).
  // relu: forward only (the caller passes 0 for the other directions).
  if (stride.size() != 2 || pad.size() != 4 || dilation.size() != 2) {
    return Fail("expects strides[2], padding[4], dilation[2]");
  }
  ffi::AnyBuffer x = kind == Kind::kBwdData ? out : a;
  ffi::AnyBuffer w = kind == Kind::kBwdWeights ? out : b;
  ffi::AnyBuffer y = kind == Kind::kFwd ? out : (kind == Kind::kBwdData ? a : b);
  if (x.dimensions().size() != 4 || w.dimensions().size() != 4 || y.dimensions().size() != 4) {
    return Fail("expects rank-4 NHWC activations and HWIO kernels");
  }
  Geometry g;
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  g.n = xd[0]; g.h = xd[1]; g.w = xd[2]; g.c = xd[3];
  g.kh = wd[0]; g.kw = wd[1]; g.o = wd[3];
  g.oh = yd[1]; g.ow = yd[2];
  for (int i = 0; i < 2; ++i) { g.stride[i] = stride[i]; g.dilation[i] = dilation[i]; }
  for (int i = 0; i < 4; ++i) g.pad[i] = pad[i];
  auto dtype = [](ffi::DataType t, memory::data_type* out) {
    if (t == ffi::DataType::F32) {
      *out = memory::data_type::f32;
    } else if (t == ffi::DataType::BF16) {
      *out = memory::data_type::bf16;
    } else {
      return false;
    }
    return true;
  };
  if (!dtype(x.element_type(), &g.dt) || !dtype(w.element_type(), &g.wdt)) {
    return Fail("float32 or bfloat16 operands only");
  }
  g.relu = relu;
  g.blocked = kind != Kind::kFwd && BackwardLayout().load() == kBlocked;
  if (wd[2] != g.c || yd[0] != g.n || yd[3] != g.o || y.element_type() != x.element_type()) {
    return Fail("operand shapes or dtypes disagree");
  }
  if (bias != nullptr) {
    g.bias = true;
    const auto bt = bias->element_type();
    if (bias->dimensions().size() != 1 || bias->dimensions()[0] != g.o ||
        (bt != ffi::DataType::F32 && bt != ffi::DataType::BF16)) {
      return Fail("the bias must be float32 or bfloat16 with one value per output channel");
    }
    g.bias_dt = bt == ffi::DataType::F32 ? memory::data_type::f32 : memory::data_type::bf16;
  }
  try {
    const Cached& c = Get(kind, g);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    const bool finite_relu = c.has_finite_relu && PartialSumsFinite(g, x, w, bias);
    const memory::desc& scratch_desc = finite_relu ? c.finite_relu_scratchpad : c.scratchpad;
    memory scratch(scratch_desc, eng, Grow(buffers.scratchpad, scratch_desc.get_size()));
    memory user_x(c.user_src, eng, x.untyped_data());
    memory user_y(c.user_dst, eng, y.untyped_data());
    memory xm = user_x, ym = user_y;
    Scratch blocked_x, blocked_y;
    if (c.reorder_src) {
      xm = memory(c.src, eng, blocked_x.Get(c.src.get_size()));
      if (kind != Kind::kBwdData) {
        c.src_reorder.execute(stream, {{DNNL_ARG_FROM, user_x}, {DNNL_ARG_TO, xm}});
      }
    }
    if (c.reorder_dst) {
      ym = memory(c.dst, eng, blocked_y.Get(c.dst.get_size()));
      if (kind != Kind::kFwd) {
        c.dst_reorder.execute(stream, {{DNNL_ARG_FROM, user_y}, {DNNL_ARG_TO, ym}});
      }
    }
    memory user_w(c.user_weights, eng, w.untyped_data());
    memory wm = user_w;
    if (c.reorder_weights) {
      wm = memory(c.weights, eng, Grow(buffers.weights, c.weights.get_size()));
      if (kind != Kind::kBwdWeights) {
        c.weights_reorder.execute(stream, {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, wm}});
      }
    }
    std::unordered_map<int, memory> args;
    if (bias != nullptr) {
      args[kind == Kind::kFwd ? DNNL_ARG_BIAS : DNNL_ARG_DIFF_BIAS] =
          memory(c.bias, eng, bias->untyped_data());
    }
    if (kind == Kind::kFwd) {
      args.insert({{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym},
                   {DNNL_ARG_SCRATCHPAD, scratch}});
      (finite_relu ? c.finite_relu_conv : c.conv).execute(stream, args);
      if (c.reorder_dst) {
        c.dst_reorder.execute(stream, {{DNNL_ARG_FROM, ym}, {DNNL_ARG_TO, user_y}});
      }
    } else if (kind == Kind::kBwdData) {
      c.conv.execute(stream, {{DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_WEIGHTS, wm},
                              {DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (c.reorder_src) {
        c.src_reorder.execute(stream, {{DNNL_ARG_FROM, xm}, {DNNL_ARG_TO, user_x}});
      }
    } else {
      args.insert({{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_DIFF_WEIGHTS, wm},
                   {DNNL_ARG_SCRATCHPAD, scratch}});
      c.conv.execute(stream, args);
      if (c.reorder_weights) {
        c.weights_reorder.execute(stream, {{DNNL_ARG_FROM, wm}, {DNNL_ARG_TO, user_w}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("vgg_flax oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
               ffi::Span<const int64_t> s, ffi::Span<const int64_t> p,
               ffi::Span<const int64_t> d, int64_t relu) {
  return Run(Kind::kFwd, x, w, *y, s, p, d, nullptr, relu != 0);
}
ffi::Error BwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                   ffi::Span<const int64_t> s, ffi::Span<const int64_t> p,
                   ffi::Span<const int64_t> d) {
  return Run(Kind::kBwdData, dy, w, *dx, s, p, d);
}
ffi::Error BwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                      ffi::Span<const int64_t> s, ffi::Span<const int64_t> p,
                      ffi::Span<const int64_t> d) {
  return Run(Kind::kBwdWeights, x, dy, *dw, s, p, d);
}

ffi::Error BiasFwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> s,
                   ffi::Span<const int64_t> p, ffi::Span<const int64_t> d, int64_t relu) {
  return Run(Kind::kFwd, x, w, *y, s, p, d, &bias, relu != 0);
}
ffi::Error BwdWeightsBias(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                          ffi::Result<ffi::AnyBuffer> db, ffi::Span<const int64_t> s,
                          ffi::Span<const int64_t> p, ffi::Span<const int64_t> d) {
  ffi::AnyBuffer bias = *db;
  return Run(Kind::kBwdWeights, x, dy, *dw, s, p, d, &bias);
}

}  // namespace

#define VGG_FLAX_CONV_ATTRS                                  \
  .Attr<ffi::Span<const int64_t>>("strides")                 \
      .Attr<ffi::Span<const int64_t>>("padding")             \
      .Attr<ffi::Span<const int64_t>>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(VggFlaxConvBiasFwd, BiasFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() VGG_FLAX_CONV_ATTRS
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VggFlaxConvBwdWeightsBias, BwdWeightsBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() VGG_FLAX_CONV_ATTRS);

#define VGG_FLAX_CONV_HANDLER(name, fn)                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                             \
                                ffi::Ffi::Bind()                      \
                                    .Arg<ffi::AnyBuffer>()            \
                                    .Arg<ffi::AnyBuffer>()            \
                                    .Ret<ffi::AnyBuffer>()            \
                                    .Attr<ffi::Span<const int64_t>>("strides") \
                                    .Attr<ffi::Span<const int64_t>>("padding") \
                                    .Attr<ffi::Span<const int64_t>>("dilation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VggFlaxConvFwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() VGG_FLAX_CONV_ATTRS
                                  .Attr<int64_t>("relu"));
VGG_FLAX_CONV_HANDLER(VggFlaxConvBwdData, BwdData)
VGG_FLAX_CONV_HANDLER(VggFlaxConvBwdWeights, BwdWeights)

// Whether this CPU has oneDNN kernels for convolutions of the dtype (bf16 needs AVX-512 or
// newer; without it oneDNN declines to build the primitive). Asked once per dtype by Python,
// which uses XLA's convolutions where the answer is no.
extern "C" int VggFlaxOnednnSupports(int bf16) {
  Geometry g{};
  g.n = 1; g.h = g.w = 8; g.c = 16; g.kh = g.kw = 3; g.o = 16; g.oh = g.ow = 8;
  g.stride[0] = g.stride[1] = 1;
  g.dilation[0] = g.dilation[1] = 1;
  for (auto& p : g.pad) p = 1;
  g.dt = g.wdt = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  try {
    for (Kind kind : {Kind::kFwd, Kind::kBwdData, Kind::kBwdWeights}) Get(kind, g);
  } catch (const dnnl::error&) {
    return 0;
  }
  return 1;
}

// The backward passes' activation layout (Layout), and a switch for the tests of both.
extern "C" int VggFlaxOnednnBackwardLayout() { return BackwardLayout().load(); }
extern "C" void VggFlaxOnednnSetBackwardLayout(int layout) {
  BackwardLayout().store(layout == kBlocked ? kBlocked : kNhwc);
}

// The oneDNN version this library runs, for the benchmark's record.
extern "C" const char* VggFlaxOnednnVersion() {
  static std::string v = [] {
    const dnnl_version_t* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." +
           std::to_string(ver->patch);
  }();
  return v.c_str();
}
