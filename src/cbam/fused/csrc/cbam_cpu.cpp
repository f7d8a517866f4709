// Fused CPU kernels for CBAM (what they compute, and why so, is in ../kernels.py and ../function.py).
//
// Every kernel sees a feature map as a dense (N, R, K) array whose last dimension is contiguous: R = C and K = H*W
// for NCHW, R = H*W and K = C for channels-last. A "row" is one (n, r) run of K elements. Per-channel (N, C) and
// per-position (N, H*W) vectors are therefore row vectors (N, R) or column vectors (N, K) depending on the layout.
// Reductions along a row use one vector register of independent lanes; reductions across rows accumulate a block
// of columns that stays in L1/L2. Accumulation is in at::opmath_type (float for float16 / bfloat16 / float32,
// double for float64). Maxima keep the index of their first occurrence (only a strictly greater value replaces),
// so backward can route each max's gradient to exactly one element; a nan anywhere in a pooled run makes its
// maximum nan, as torch.amax does.
//
// Parallelism is PyTorch's own thread pool (at::parallel_for). Batches with a few samples per thread are split by
// sample: each thread takes its samples a bunch (about 2 MB) at a time, from the last one, and runs a bunch's
// passes back to back, so that a sample read once from memory is read again from the cache (channel pools, MLP,
// spatial pools and, at inference, the output); smaller batches are split inside each sample. Partial results
// that share an output are combined in a fixed order, and the MLP of a bunch is dot products in a fixed order, so
// results do not depend on the number of threads or on how samples are bunched.

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
// Tuning (settable through cbam_cpu::configure, which the tests use to force every split and bunch boundary).
int64_t kColBlock = 4096;       // columns accumulated together across rows
int64_t kTaskElems = 1 << 15;   // smallest useful task when a sample is split into row blocks
int64_t kBunchBytes = 2 << 20;  // samples a thread takes through the passes together (read again from the cache)
int64_t kStreamBytes = 16 << 20;  // full-size float outputs at least this large bypass the cache when written
constexpr int64_t kMinTasks = 8;  // row blocks are added until there are this many tasks (if large enough)

// ------------------------------------------------------------------------------------------------ vectors
// GCC / Clang vector extensions: one 64-byte register of acc_t (16 floats, 8 doubles), split by the compiler into
// narrower registers where the machine has no AVX-512. Lanes of a comparison are integers of the same width.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
using Mask = decltype(Vec<T>{} > Vec<T>{});
template <typename T>
using Lane = std::remove_cv_t<std::remove_reference_t<decltype(Mask<T>{}[0])>>;
template <typename T>
constexpr int kWidth = 64 / sizeof(T);

// bfloat16 is the upper half of a float32: widening is a shift, narrowing rounds to nearest even (nan to the quiet
// nan 0x7FC0), bit for bit what c10::BFloat16 does, 16 lanes at a time.
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));

inline Vec<float> bf16_to_float(const c10::BFloat16* p) {
  U16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  Vec<float> v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

inline void float_to_bf16(c10::BFloat16* p, const Vec<float>& v) {
  U32x16 u;
  std::memcpy(&u, &v, sizeof(u));
  U32x16 r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const U32x16 nan = (U32x16)(v != v);
  r = (r & ~nan) | (nan & 0x7FC0u);
  const U16x16 h = __builtin_convertvector(r, U16x16);
  std::memcpy(p, &h, sizeof(h));
}

template <typename acc_t, typename scalar_t>
inline Vec<acc_t> vload(const scalar_t* p) {
  Vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    v = bf16_to_float(p);
  } else {
    for (int l = 0; l < kWidth<acc_t>; ++l) v[l] = static_cast<acc_t>(p[l]);
  }
  return v;
}

template <typename T>
inline void vstore(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Whole-vector stores into scalar_t from acc_t lanes exist for these pairs (others go element by element).
template <typename scalar_t, typename acc_t>
constexpr bool kVectorStore =
    std::is_same_v<scalar_t, acc_t> || (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>);

template <typename scalar_t, typename acc_t>
inline void vstore_as(scalar_t* p, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>)
    vstore<acc_t>(p, v);
  else
    float_to_bf16(p, v);
}

// Arg-max arrays hold int32; lanes of double comparisons are int64, converted lane by lane.
template <typename T>
inline Mask<T> vload_index(const int32_t* p) {
  Mask<T> v;
  if constexpr (sizeof(Lane<T>) == sizeof(int32_t)) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int l = 0; l < kWidth<T>; ++l) v[l] = p[l];
  }
  return v;
}

template <typename T>
inline void vstore_index(int32_t* p, const Mask<T>& v) {
  if constexpr (sizeof(Lane<T>) == sizeof(int32_t)) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int l = 0; l < kWidth<T>; ++l) p[l] = static_cast<int32_t>(v[l]);
  }
}

// Horizontal reductions as butterflies: after log2(lanes) exchange steps every lane holds the result (a few
// vector instructions instead of one scalar step per lane; rows of 7 x 7 maps are short).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define CBAM_HAS_SHUFFLE 1
#endif
#endif

template <size_t S, typename V, size_t... I>
inline V exchange(const V& v, std::index_sequence<I...>) {
#ifdef CBAM_HAS_SHUFFLE
  return __builtin_shufflevector(v, v, (I ^ S)...);
#else
  V out;
  ((out[I] = v[I ^ S]), ...);
  return out;
#endif
}

template <typename V, typename Op>
inline V butterfly(V v, const Op& op) {
  constexpr size_t W = sizeof(V) / sizeof(v[0]);
  using Seq = std::make_index_sequence<W>;
  if constexpr (W >= 16) v = op(v, exchange<8>(v, Seq{}));
  if constexpr (W >= 8) v = op(v, exchange<4>(v, Seq{}));
  v = op(v, exchange<2>(v, Seq{}));
  return op(v, exchange<1>(v, Seq{}));
}

template <typename T>
inline T hsum(const Vec<T>& v) {
  return butterfly(v, [](const Vec<T>& a, const Vec<T>& b) { return a + b; })[0];
}

// out[m] = sum_i a[i] * b[m][i] for M vectors b[m]: a is read once, and four independent chains of multiply-adds per
// vector keep the adder busy (a single chain waits on each one's latency). Each out[m] is summed in the same order
// whatever M is.
template <int M, typename T>
inline void dots(const T* a, const T* const* b, int64_t n, T* out) {
  static_assert(M == 1 || M == 2, "one or two vectors at a time (the sums' order does not depend on M)");
  constexpr int W = kWidth<T>, A = 4;
  Vec<T> acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < A; ++u) acc[m][u] = Vec<T>{};
  int64_t i = 0;
  for (; i + A * W <= n; i += A * W)
    for (int u = 0; u < A; ++u) {
      const Vec<T> av = vload<T>(a + i + u * W);
      for (int m = 0; m < M; ++m) acc[m][u] += av * vload<T>(b[m] + i + u * W);
    }
  for (; i + W <= n; i += W) {
    const Vec<T> av = vload<T>(a + i);
    for (int m = 0; m < M; ++m) acc[m][0] += av * vload<T>(b[m] + i);
  }
  for (int m = 0; m < M; ++m) {
    Vec<T> t = acc[m][0];
    for (int u = 1; u < A; ++u) t += acc[m][u];
    out[m] = hsum<T>(t);
  }
  for (; i < n; ++i)
    for (int m = 0; m < M; ++m) out[m] += a[i] * b[m][i];
}

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// Streaming stores are weakly ordered: every task that made some completes them before it ends (for_range does,
// after each chunk of rows; one fence per row measured 3x slower on channels-last rows of 256 floats).
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

// out[k] = one(k) for k < K, where vec(k) gives the vector of values k .. k + W - 1. With `stream` (float32 rows of
// outputs larger than the cache) whole-vector stores bypass the cache: the output lines are not read first (a
// third less memory traffic), and the output does not evict the input that is still to be read. The caller runs
// inside for_range, which issues the fence that completes them.
template <typename scalar_t, typename acc_t, typename FV, typename F1>
inline void write_row(scalar_t* out, int64_t K, bool stream, const FV& vec, const F1& one) {
  constexpr int W = kWidth<acc_t>;
  int64_t k = 0;
#if defined(__AVX512F__) || defined(__AVX__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (stream) {
      for (; k < K && reinterpret_cast<uintptr_t>(out + k) % 64 != 0; ++k) out[k] = one(k);
      for (; k + W <= K; k += W) {
        const Vec<float> v = vec(k);
#if defined(__AVX512F__)
        _mm512_stream_ps(out + k, reinterpret_cast<const __m512&>(v));
#else
        _mm256_stream_ps(out + k, reinterpret_cast<const __m256*>(&v)[0]);
        _mm256_stream_ps(out + k + 8, reinterpret_cast<const __m256*>(&v)[1]);
#endif
      }
      for (; k < K; ++k) out[k] = one(k);
      return;
    }
  }
#endif
  (void)stream;
  if constexpr (kVectorStore<scalar_t, acc_t>) {  // whole vectors, then the tail
    for (; k + W <= K; k += W) vstore_as<scalar_t, acc_t>(out + k, vec(k));
  }
  for (; k < K; ++k) out[k] = one(k);
}

bool stream_output(const Tensor& t) {
  return t.scalar_type() == at::kFloat && static_cast<int64_t>(t.numel() * sizeof(float)) >= kStreamBytes;
}

template <typename acc_t>
inline void keep_nan(acc_t sum, acc_t& max) {
  if (std::isnan(sum)) max = sum;  // a nan anywhere makes the sum nan; the strict comparisons skipped it
}

// f(a, b) with a and b as compile-time std::bool_constant values: one instantiation per combination of two flags.
template <typename F>
void with_flags(bool a, bool b, const F& f) {
  if (a && b)
    f(std::true_type{}, std::true_type{});
  else if (a)
    f(std::true_type{}, std::false_type{});
  else if (b)
    f(std::false_type{}, std::true_type{});
  else
    f(std::false_type{}, std::false_type{});
}

// ------------------------------------------------------------------------------------------------ parallelism
int64_t threads() { return at::get_num_threads(); }

// Whether work on n samples runs in parallel over samples: when there are a few per thread (each thread then works
// on whole samples, which stay in its caches); else the samples go one after the other, each pass splitting rows.
bool by_samples(int64_t n) {
  const int64_t t = threads();
  return !at::in_parallel_region() && t > 1 && n >= 2 * t && (n % t == 0 || n >= 8 * t);
}

// fn(n) for every sample, in parallel over samples when by_samples(n).
template <typename F>
void for_samples(int64_t n, const F& fn) {
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  };
  if (by_samples(n))
    at::parallel_for(0, n, 1, run);
  else
    run(0, n);
}

// fn(i) for i in [0, count), in parallel chunks of about kTaskElems elements (serial inside a parallel region).
// Each chunk ends with a store fence: the rows it wrote with streaming stores are complete when it returns.
template <typename F>
void for_range(int64_t count, int64_t elems_each, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, elems_each));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
    stream_fence();
  });
}

// Blocks of an (N, R, K) pass: column blocks of at most kColBlock (a multiple of 16), and row blocks when there
// would otherwise be fewer than kMinTasks tasks, keeping at least about kTaskElems elements per task. The split
// depends on the sizes only (not on the thread count), so the order of every sum does too.
struct Split {
  int64_t n, r, k;
  int64_t r_block, k_block, r_blocks, k_blocks;
  int64_t tasks() const { return n * r_blocks * k_blocks; }
};

Split make_split(int64_t n, int64_t r, int64_t k) {
  Split s{n, r, k, r, k, 1, 1};
  if (k > kColBlock) {
    s.k_blocks = (k + kColBlock - 1) / kColBlock;
    s.k_block = ((k + s.k_blocks - 1) / s.k_blocks + 15) / 16 * 16;
    s.k_blocks = (k + s.k_block - 1) / s.k_block;
  }
  const int64_t have = n * s.k_blocks;
  if (have < kMinTasks && r > 1) {
    int64_t blocks = (kMinTasks + have - 1) / have;
    blocks = std::min({blocks, std::max<int64_t>(1, r * s.k_block / kTaskElems), r});
    s.r_block = (r + blocks - 1) / blocks;
    s.r_blocks = (r + s.r_block - 1) / s.r_block;
  }
  return s;
}

// fn(n, rb, kb, r0, r1, k0, k1) for every block, in parallel.
template <typename F>
void for_blocks(const Split& s, const F& fn) {
  at::parallel_for(0, s.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t kb = t % s.k_blocks, rb = (t / s.k_blocks) % s.r_blocks, n = t / (s.k_blocks * s.r_blocks);
      const int64_t r0 = rb * s.r_block, k0 = kb * s.k_block;
      fn(n, rb, kb, r0, std::min(r0 + s.r_block, s.r), k0, std::min(k0 + s.k_block, s.k));
    }
  });
}

// ------------------------------------------------------------------------------------------------ checks
void check_map(const Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "cbam_cpu: ", what, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.numel() > 0, "cbam_cpu: ", what,
              " must be a non-empty contiguous (N, R, K) tensor, got ", x.sizes());
}

void check_acc(const Tensor& v, const Tensor& x, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(v.sizes() == shape && v.is_contiguous() && v.device().is_cpu(), "cbam_cpu: ", what,
              " must be a contiguous CPU tensor of shape ", shape, ", got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::toOpMathType(x.scalar_type()), "cbam_cpu: ", what, " must be ",
              at::toOpMathType(x.scalar_type()), ", got ", v.scalar_type());
}

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

Tensor new_acc(const Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().dtype(at::toOpMathType(x.scalar_type())));
}

Tensor new_index(const Tensor& x, at::IntArrayRef shape) { return at::empty(shape, x.options().dtype(at::kInt)); }

// ------------------------------------------------------------------------------------------------ transforms
// Element transforms applied while a kernel reads a map: by row (one scalar pair per row, bound once per row) or
// by column (vectors indexed by the column). f.row(r) gives the transform of row r, with vec(v, k) for the vector of
// columns k .. k + W - 1 and one(v, k) for column k. They carry the gates (x * gc) and a folded BatchNorm in front
// of the module (x = y * scale + shift, per channel).
template <typename acc_t>
struct Ident {
  Vec<acc_t> vec(const Vec<acc_t>& v, int64_t) const { return v; }
  acc_t one(acc_t v, int64_t) const { return v; }
  Ident row(int64_t) const { return *this; }
};

template <typename acc_t>
struct RowAffineAt {  // v * a + b (b = 0 for a scale)
  acc_t a, b;
  Vec<acc_t> vec(const Vec<acc_t>& v, int64_t) const { return v * a + b; }
  acc_t one(acc_t v, int64_t) const { return v * a + b; }
};

template <typename acc_t>
struct RowScale {
  const acc_t* s;
  RowAffineAt<acc_t> row(int64_t r) const { return {s[r], acc_t(0)}; }
};

template <typename acc_t>
struct RowAffine {
  const acc_t *a, *b;
  RowAffineAt<acc_t> row(int64_t r) const { return {a[r], b[r]}; }
};

template <typename acc_t>
struct ColScale {
  const acc_t* s;
  Vec<acc_t> vec(const Vec<acc_t>& v, int64_t k) const { return v * vload<acc_t>(s + k); }
  acc_t one(acc_t v, int64_t k) const { return v * s[k]; }
  ColScale row(int64_t) const { return *this; }
};

template <typename acc_t>
struct ColAffine {
  const acc_t *a, *b;
  Vec<acc_t> vec(const Vec<acc_t>& v, int64_t k) const { return v * vload<acc_t>(a + k) + vload<acc_t>(b + k); }
  acc_t one(acc_t v, int64_t k) const { return v * a[k] + b[k]; }
  ColAffine row(int64_t) const { return *this; }
};

template <typename acc_t>
struct ColShift {  // v + s[k]
  const acc_t* s;
  Vec<acc_t> vec(const Vec<acc_t>& v, int64_t k) const { return v + vload<acc_t>(s + k); }
  acc_t one(acc_t v, int64_t k) const { return v + s[k]; }
  ColShift row(int64_t) const { return *this; }
};

template <typename acc_t>
struct RowShift {
  const acc_t* s;
  RowAffineAt<acc_t> row(int64_t r) const { return {acc_t(1), s[r]}; }
};

// ------------------------------------------------------------------------------------------------ pools
// Sum, max and first arg-max along one row of K elements, each element transformed by f (a row-bound transform).
template <typename scalar_t, typename acc_t, bool ARG, typename F>
inline void pool_row(const scalar_t* x, const F& f, int64_t K, acc_t& sum_out, acc_t& max_out, int32_t* arg_out) {
  constexpr int W = kWidth<acc_t>;
  using V = Vec<acc_t>;
  using M = Mask<acc_t>;
  using I = Lane<acc_t>;
  auto load1 = [&](int64_t k) { return f.one(static_cast<acc_t>(x[k]), k); };
  auto loadv = [&](int64_t k) { return f.vec(vload<acc_t>(x + k), k); };
  if (K < W) {
    acc_t s = load1(0), m = s;
    int32_t a = 0;
    for (int64_t k = 1; k < K; ++k) {
      const acc_t v = load1(k);
      s += v;
      if (v > m) m = v, a = static_cast<int32_t>(k);
    }
    keep_nan(s, m);
    sum_out = s, max_out = m;
    if constexpr (ARG) *arg_out = a;
    return;
  }
  M lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  V s = loadv(0), m = s;
  M a = lane;
  int64_t k = W;
  for (; k + W <= K; k += W) {
    const V v = loadv(k);
    s += v;
    const M greater = v > m;
    m = greater ? v : m;
    if constexpr (ARG) a = greater ? lane + static_cast<I>(k) : a;
  }
  const V top = butterfly(m, [](const V& p, const V& q) { return q > p ? q : p; });
  acc_t total = hsum<acc_t>(s), best = top[0];
  I first = std::numeric_limits<I>::max();
  if constexpr (ARG) {  // the smallest index among the lanes holding the maximum
    const M candidates = m == top ? a : M{} + std::numeric_limits<I>::max();
    first = butterfly(candidates, [](const M& p, const M& q) { return q < p ? q : p; })[0];
  }
  for (; k < K; ++k) {  // tail, in index order after every lane: only a strictly greater value replaces
    const acc_t v = load1(k);
    total += v;
    if (v > best) best = v, first = static_cast<I>(k);
  }
  keep_nan(total, best);
  sum_out = total, max_out = best;
  if constexpr (ARG) *arg_out = first == std::numeric_limits<I>::max() ? 0 : static_cast<int32_t>(first);
}

// Rows [r0, r1) of one sample, columns [k0, k1): sum, max and first arg-max (a row index) across the rows, into
// sum / max / arg (indexed from column k0); element (r, k) transformed by f.row(r).
template <typename scalar_t, typename acc_t, bool ARG, typename F>
void pool_block(const scalar_t* x, const F& f, int64_t K, int64_t r0, int64_t r1, int64_t k0, int64_t k1, acc_t* sum,
                acc_t* max, int32_t* arg) {
  constexpr int W = kWidth<acc_t>;
  using V = Vec<acc_t>;
  using M = Mask<acc_t>;
  const int64_t len = k1 - k0;
  {
    const scalar_t* row = x + r0 * K + k0;
    const auto fr = f.row(r0);
    int64_t j = 0;
    for (; j + W <= len; j += W) {
      const V v = fr.vec(vload<acc_t>(row + j), k0 + j);
      vstore<acc_t>(sum + j, v), vstore<acc_t>(max + j, v);
    }
    for (; j < len; ++j) {
      const acc_t v = fr.one(static_cast<acc_t>(row[j]), k0 + j);
      sum[j] = v, max[j] = v;
    }
    if constexpr (ARG) std::fill(arg, arg + len, static_cast<int32_t>(r0));
  }
  // Four rows per sweep over the accumulators (a quarter of their loads and stores). Within the four, the earlier
  // row keeps ties; only a strictly greater value replaces the accumulator.
  int64_t r = r0 + 1;
  for (; r + 4 <= r1; r += 4) {
    const scalar_t* row = x + r * K + k0;
    const auto f0 = f.row(r), f1 = f.row(r + 1), f2 = f.row(r + 2), f3 = f.row(r + 3);
    const M i0 = M{} + static_cast<Lane<acc_t>>(r);
    int64_t j = 0;
    for (; j + W <= len; j += W) {
      const int64_t k = k0 + j;
      const V v0 = f0.vec(vload<acc_t>(row + j), k), v1 = f1.vec(vload<acc_t>(row + K + j), k);
      const V v2 = f2.vec(vload<acc_t>(row + 2 * K + j), k), v3 = f3.vec(vload<acc_t>(row + 3 * K + j), k);
      vstore<acc_t>(sum + j, vload<acc_t>(sum + j) + ((v0 + v1) + (v2 + v3)));
      const M b01 = v1 > v0, b23 = v3 > v2;
      const V m01 = b01 ? v1 : v0, m23 = b23 ? v3 : v2;
      const M b = m23 > m01;
      const V m = b ? m23 : m01;
      V mv = vload<acc_t>(max + j);
      const M greater = m > mv;
      vstore<acc_t>(max + j, greater ? m : mv);
      if constexpr (ARG) {
        const M a01 = b01 ? i0 + 1 : i0, a23 = b23 ? i0 + 3 : i0 + 2;
        const M ai = b ? a23 : a01;
        vstore_index<acc_t>(arg + j, greater ? ai : vload_index<acc_t>(arg + j));
      }
    }
    for (; j < len; ++j) {
      const acc_t vs[4] = {f0.one(static_cast<acc_t>(row[j]), k0 + j), f1.one(static_cast<acc_t>(row[K + j]), k0 + j),
                           f2.one(static_cast<acc_t>(row[2 * K + j]), k0 + j),
                           f3.one(static_cast<acc_t>(row[3 * K + j]), k0 + j)};
      for (int i = 0; i < 4; ++i) {
        sum[j] += vs[i];
        if (vs[i] > max[j]) {
          max[j] = vs[i];
          if constexpr (ARG) arg[j] = static_cast<int32_t>(r + i);
        }
      }
    }
  }
  for (; r < r1; ++r) {
    const scalar_t* row = x + r * K + k0;
    const auto fr = f.row(r);
    const M ir = M{} + static_cast<Lane<acc_t>>(r);
    int64_t j = 0;
    for (; j + W <= len; j += W) {
      const V v = fr.vec(vload<acc_t>(row + j), k0 + j);
      vstore<acc_t>(sum + j, vload<acc_t>(sum + j) + v);
      const V mv = vload<acc_t>(max + j);
      const M greater = v > mv;
      vstore<acc_t>(max + j, greater ? v : mv);
      if constexpr (ARG) vstore_index<acc_t>(arg + j, greater ? ir : vload_index<acc_t>(arg + j));
    }
    for (; j < len; ++j) {
      const acc_t v = fr.one(static_cast<acc_t>(row[j]), k0 + j);
      sum[j] += v;
      if (v > max[j]) {
        max[j] = v;
        if constexpr (ARG) arg[j] = static_cast<int32_t>(r);
      }
    }
  }
}

// Pools of each of one sample's R rows (along K), row r transformed by f.row(r).
template <typename scalar_t, typename acc_t, bool ARG, typename F>
void sample_pool_rows(const scalar_t* x, const F& f, int64_t R, int64_t K, acc_t* sum, acc_t* max, int32_t* arg) {
  for_range(R, K, [&](int64_t r) {
    pool_row<scalar_t, acc_t, ARG>(x + r * K, f.row(r), K, sum[r], max[r], ARG ? arg + r : nullptr);
  });
}

// Pools of each of one sample's K columns (across the R rows), element (r, k) transformed by f.row(r).
template <typename scalar_t, typename acc_t, bool ARG, typename F>
void sample_pool_cols(const scalar_t* x, const F& f, int64_t R, int64_t K, acc_t* sum, acc_t* max, int32_t* arg) {
  const Split s = make_split(1, R, K);
  auto block = [&](int64_t r0, int64_t r1, int64_t k0, int64_t k1, acc_t* sp, acc_t* mp, int32_t* ap) {
    pool_block<scalar_t, acc_t, ARG>(x, f, K, r0, r1, k0, k1, sp, mp, ap);
  };
  if (s.r_blocks == 1) {
    for_blocks(s, [&](int64_t, int64_t, int64_t, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
      block(r0, r1, k0, k1, sum + k0, max + k0, ARG ? arg + k0 : nullptr);
    });
  } else {  // row blocks into partials, then combined in row order: the first block holding the max wins ties
    std::vector<acc_t> ps(s.r_blocks * K), pm(s.r_blocks * K);
    std::vector<int32_t> pa(ARG ? s.r_blocks * K : 0);
    for_blocks(s, [&](int64_t, int64_t rb, int64_t, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
      const int64_t o = rb * K + k0;
      block(r0, r1, k0, k1, ps.data() + o, pm.data() + o, ARG ? pa.data() + o : nullptr);
    });
    std::copy(ps.begin(), ps.begin() + K, sum);
    std::copy(pm.begin(), pm.begin() + K, max);
    if constexpr (ARG) std::copy(pa.begin(), pa.begin() + K, arg);
    for (int64_t b = 1; b < s.r_blocks; ++b) {  // block by block, columns innermost (vectorised)
      const acc_t *bs = ps.data() + b * K, *bm = pm.data() + b * K;
      const int32_t* ba = ARG ? pa.data() + b * K : nullptr;
      for (int64_t k = 0; k < K; ++k) {
        sum[k] += bs[k];
        const bool greater = bm[k] > max[k];
        max[k] = greater ? bm[k] : max[k];
        if constexpr (ARG) arg[k] = greater ? ba[k] : arg[k];
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) keep_nan(sum[k], max[k]);
}

// ------------------------------------------------------------------------------------------------ the two gates
template <typename acc_t>
struct Mlp {
  const acc_t *w1, *b1, *w2, *b2;  // [hidden, C], [hidden], [C, hidden], [C]; biases may be null
  int64_t channels, hidden;
};

// Channel gates of B samples by dot products, gc[i] = sigmoid(sum_p fc2(relu(fc1(pooled[i][p])))), each weight row
// read once for all of them and each sum in a fixed order, so a sample's gate does not depend on which samples
// share the call or on how the rows are split across threads (each thread calls it for its own few samples, or,
// outside a parallel region, the rows are split; a library matrix product for a few samples packed the weights on
// every call, measured a third of the module's time at 7 x 7). pooled[i * n_pools + p] is sample i's
// pool p (C), hpre (null or like pooled) receives fc1's pre-activations (hidden), gc[i] sample i's gate (C); act
// (B, hidden) is scratch.
template <typename acc_t>
void bunch_mlp(const Mlp<acc_t>& mlp, int64_t B, int n_pools, const acc_t* const* pooled, acc_t* const* hpre,
               acc_t* act, acc_t* const* gc) {
  const int64_t C = mlp.channels, Hd = mlp.hidden, V = B * n_pools;
  auto rows_dot = [](const acc_t* w, const acc_t* const* vecs, int64_t count, int64_t n, acc_t* out) {
    int64_t v = 0;
    for (; v + 2 <= count; v += 2) dots<2>(w, vecs + v, n, out + v);
    if (v < count) dots<1>(w, vecs + v, n, out + v);
  };
  // rows split across threads when the caller is not already running in parallel (every row on its own: the
  // result does not depend on the split)
  const int64_t rows_per_task = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, V * C));
  at::parallel_for(0, Hd, rows_per_task, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> h(V);
    for (int64_t j = j0; j < j1; ++j) {
      rows_dot(mlp.w1 + j * C, pooled, V, C, h.data());
      const acc_t b = mlp.b1 ? mlp.b1[j] : acc_t(0);
      for (int64_t i = 0; i < B; ++i) {
        acc_t a = 0;
        for (int p = 0; p < n_pools; ++p) {
          const acc_t hp = h[i * n_pools + p] + b;
          if (hpre) hpre[i * n_pools + p][j] = hp;
          a += hp < 0 ? acc_t(0) : hp;  // relu; a nan stays nan
        }
        act[i * Hd + j] = a;  // fc2 is linear: fc2 of the summed activations, plus n_pools biases
      }
    }
  });
  std::vector<const acc_t*> acts(B);
  for (int64_t i = 0; i < B; ++i) acts[i] = act + i * Hd;
  const int64_t channels_per_task = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, B * Hd));
  at::parallel_for(0, C, channels_per_task, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> g(B);
    for (int64_t c = c0; c < c1; ++c) {
      rows_dot(mlp.w2 + c * Hd, acts.data(), B, Hd, g.data());
      const acc_t b = mlp.b2 ? static_cast<acc_t>(n_pools) * mlp.b2[c] : acc_t(0);
      for (int64_t i = 0; i < B; ++i) gc[i][c] = sigmoid(g[i] + b);
    }
  });
}

// Zero-bordered copy of `maps` (m, H, W) for a k x k 'same' correlation: rows padded to whole groups of four
// vectors plus the kernel's reach, so every tap of every output row is a run of full-vector multiply-adds.
template <typename acc_t>
struct Padded {
  static constexpr int kBlock = 4 * kWidth<acc_t>;
  int64_t pad, Wv, Wp, Hp;
  std::vector<acc_t> buf;
  Padded(const acc_t* maps, int64_t m, int64_t ks, int64_t H, int64_t W)
      : pad(ks / 2), Wv((W + kBlock - 1) / kBlock * kBlock), Wp(Wv + ks - 1), Hp(H + ks - 1), buf(m * Hp * Wp) {
    for (int64_t c = 0; c < m; ++c)
      for (int64_t y = 0; y < H; ++y)
        std::copy(maps + (c * H + y) * W, maps + (c * H + y + 1) * W, row(c, y + pad) + pad);
  }
  acc_t* row(int64_t c, int64_t y) { return buf.data() + (c * Hp + y) * Wp; }
};

// out[co] = bias + sum_ci correlate(in[ci], weight[co][ci]) ('same', k x k) for one sample: cin input maps and
// cout output maps of (H, W); weight is [cout][cin][k][k]. Four independent vector accumulators per group of
// columns stay in registers over all taps.
template <typename acc_t>
void correlate(const acc_t* in, int64_t cin, const acc_t* weight, int64_t cout, int64_t ks, int64_t H, int64_t W,
               acc_t bias, acc_t* out) {
  constexpr int V = kWidth<acc_t>, B = 4;
  using Vc = Vec<acc_t>;
  Padded<acc_t> p(in, cin, ks, H, W);
  std::vector<acc_t> row(p.Wv);
  for (int64_t co = 0; co < cout; ++co) {
    for (int64_t y = 0; y < H; ++y) {
      for (int64_t x0 = 0; x0 < p.Wv; x0 += B * V) {
        Vc acc[B];
        for (int b = 0; b < B; ++b) acc[b] = Vc{} + bias;
        for (int64_t ci = 0; ci < cin; ++ci) {
          for (int64_t dy = 0; dy < ks; ++dy) {
            const acc_t* src = p.row(ci, y + dy) + x0;
            const acc_t* w = weight + ((co * cin + ci) * ks + dy) * ks;
            for (int64_t dx = 0; dx < ks; ++dx)
              for (int b = 0; b < B; ++b) acc[b] += w[dx] * vload<acc_t>(src + b * V + dx);
          }
        }
        for (int b = 0; b < B; ++b) vstore<acc_t>(row.data() + x0 + b * V, acc[b]);
      }
      std::copy(row.begin(), row.begin() + W, out + (co * H + y) * W);
    }
  }
}

// The spatial convolution of one sample: maps (2, H, W), weight (2, k, k), plus bias, into out (H, W).
template <typename acc_t>
void sample_conv(const acc_t* maps, const acc_t* weight, int64_t ks, int64_t H, int64_t W, acc_t bias, acc_t* out) {
  correlate(maps, 2, weight, 1, ks, H, W, bias, out);
}

// out = (x * chan) * pos for one sample's rows; chan (the channel gate, multiplied first as in the reference) and
// pos (the spatial gate) are row or column vectors depending on the layout. With RES (1 or 2), the tail of a
// residual block is taken into the same pass: out = relu((x * chan) * pos + res), and with RES = 2 the residual is
// itself a folded BatchNorm's output, res * res_a[c] + res_b[c] (a downsampling block's shortcut). With AFF, the
// module's input is a folded BatchNorm's affine map of the tensor read, and the channel gate comes inside it:
// out = (t * in_a[c] + in_b[c]) * pos with in_a = scale * gc and in_b = shift * gc per channel (as the spatial
// pools read x * gc), chan unused. With IN_PLACE, out is x: each element is read, then written in its place.
template <typename scalar_t, typename acc_t, int RES, bool AFF, bool IN_PLACE = false>
void gate_rows(const scalar_t* x, const acc_t* chan, const acc_t* pos, bool chan_is_row, int64_t r0, int64_t r1,
               int64_t K, const scalar_t* res, const acc_t* res_a, const acc_t* res_b, const acc_t* in_a,
               const acc_t* in_b, scalar_t* out, bool stream) {
  using V = Vec<acc_t>;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* __restrict__ orow = out + r * K;
    const scalar_t* __restrict__ xin = IN_PLACE ? nullptr : x + r * K;
    const scalar_t* xr = IN_PLACE ? orow : xin;  // (one restrict pointer per array)
    const scalar_t* __restrict__ rr = RES > 0 ? res + r * K : nullptr;
    // per row: a the row's scalar factor (channel gate of NCHW row c, spatial gate of channels-last row p; 1 for
    // an NCHW row with AFF) and v the column vector (null for a channels-last row with AFF); the reference's
    // rounding order is (x * channel gate) * spatial gate
    const acc_t a = chan_is_row ? (AFF ? acc_t(1) : chan[r]) : pos[r];
    const acc_t* __restrict__ v = chan_is_row ? pos : chan;
    const acc_t ra = AFF && chan_is_row ? in_a[r] : acc_t(1), rb = AFF && chan_is_row ? in_b[r] : acc_t(0);
    const acc_t sa = RES == 2 && chan_is_row ? res_a[r] : acc_t(1), sb = RES == 2 && chan_is_row ? res_b[r] : acc_t(0);
    auto one = [&](int64_t k) {
      const acc_t t = static_cast<acc_t>(xr[k]);
      acc_t y;
      if constexpr (AFF)
        y = chan_is_row ? (t * ra + rb) * v[k] : (t * in_a[k] + in_b[k]) * a;
      else
        y = chan_is_row ? t * a * v[k] : t * v[k] * a;
      if constexpr (RES > 0) {
        acc_t t2 = static_cast<acc_t>(rr[k]);
        if constexpr (RES == 2) t2 = chan_is_row ? t2 * sa + sb : t2 * res_a[k] + res_b[k];
        y += t2;
        y = y < 0 ? acc_t(0) : y;  // a nan stays nan, as with torch.relu
      }
      return static_cast<scalar_t>(y);
    };
    if (!stream && std::is_same_v<scalar_t, acc_t>) {  // plain loop: vectorised by the compiler (restrict)
      for (int64_t k = 0; k < K; ++k) orow[k] = one(k);
      continue;
    }
    write_row<scalar_t, acc_t>(
        orow, K, stream,
        [&](int64_t k) {
          const V t = vload<acc_t>(xr + k);
          V y;
          if constexpr (AFF)
            y = chan_is_row ? (t * ra + rb) * vload<acc_t>(v + k)
                            : (t * vload<acc_t>(in_a + k) + vload<acc_t>(in_b + k)) * a;
          else
            y = chan_is_row ? t * a * vload<acc_t>(v + k) : t * vload<acc_t>(v + k) * a;
          if constexpr (RES > 0) {
            V t2 = vload<acc_t>(rr + k);
            if constexpr (RES == 2)
              t2 = chan_is_row ? t2 * sa + sb : t2 * vload<acc_t>(res_a + k) + vload<acc_t>(res_b + k);
            y += t2;
            y = y < 0 ? V{} : y;
          }
          return y;
        },
        one);
  }
}

// gate_rows for whichever of res, res_a (with res_b) and in_a (with in_b) are given (not null); in place when out is
// x.
template <typename scalar_t, typename acc_t>
void gate_rows_any(const scalar_t* x, const acc_t* chan, const acc_t* pos, bool chan_is_row, int64_t r0, int64_t r1,
                   int64_t K, const scalar_t* res, const acc_t* res_a, const acc_t* res_b, const acc_t* in_a,
                   const acc_t* in_b, scalar_t* out, bool stream) {
  with_flags(res != nullptr, in_a != nullptr, [&](auto has_res, auto has_aff) {
    constexpr bool AFF = decltype(has_aff)::value;
    constexpr int RES = decltype(has_res)::value ? 1 : 0;
    auto run = [&](auto res_kind, auto in_place) {
      gate_rows<scalar_t, acc_t, decltype(res_kind)::value, AFF, decltype(in_place)::value>(
          x, chan, pos, chan_is_row, r0, r1, K, res, res_a, res_b, in_a, in_b, out, stream);
    };
    const bool in_place = out == x;
    if (RES && res_a)
      in_place ? run(std::integral_constant<int, 2>{}, std::true_type{})
               : run(std::integral_constant<int, 2>{}, std::false_type{});
    else
      in_place ? run(std::integral_constant<int, RES>{}, std::true_type{})
               : run(std::integral_constant<int, RES>{}, std::false_type{});
  });
}

// A feature map (N, C, H, W) as the dense (N, R, K) array the kernels work on: NCHW-contiguous maps as (N, C, H*W),
// channels-last ones as (N, H*W, C); other strides are copied to NCHW first. The operators accept either layout
// (they are tagged flexible_layout, so Inductor keeps whatever layout its convolutions chose around them), and
// their full-size outputs take the input's.
struct MapShape {
  Tensor t;  // the dense map
  int64_t n, c, h, w;
  bool cl;
  int64_t p() const { return h * w; }
  int64_t rows() const { return cl ? h * w : c; }
  int64_t cols() const { return cl ? c : h * w; }
  int64_t sample() const { return c * h * w; }
  at::MemoryFormat format() const { return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }
  // another full-size map (dout, residual) in this layout
  Tensor like(const Tensor& other, const char* what) const {
    TORCH_CHECK(other.sizes() == t.sizes() && other.scalar_type() == t.scalar_type() && other.device().is_cpu(),
                "cbam_cpu: ", what, " must match the map's shape ", t.sizes(), " and dtype ", t.scalar_type(),
                ", got ", other.sizes(), " ", other.scalar_type());
    return other.contiguous(format());
  }
};

MapShape map_shape(const Tensor& x, const char* what = "x") {
  TORCH_CHECK(x.device().is_cpu(), "cbam_cpu: ", what, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0, "cbam_cpu: ", what, " must be a non-empty (N, C, H, W) map, got ",
              x.sizes());
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return {cl || x.is_contiguous() ? x : x.contiguous(), x.size(0), x.size(1), x.size(2), x.size(3), cl};
}

// A folded BatchNorm's affine times a channel gate into coef (2C): scale * gc, then shift * gc (x * gc read as one
// affine of the tensor read, by the spatial pools and the output pass).
template <typename acc_t>
void gated_affine(const acc_t* in_a, const acc_t* in_b, const acc_t* gc, int64_t C, acc_t* coef) {
  for (int64_t c = 0; c < C; ++c) coef[c] = in_a[c] * gc[c], coef[C + c] = in_b[c] * gc[c];
}

// Where the pools of samples go: batch arrays, or scratch for a bunch (sample n at row n - first).
template <typename acc_t>
struct PoolsOut {
  int64_t first;     // the sample at row 0
  acc_t* pooled[2];  // (C) per sample each: the avg and / or max channel descriptors, in that order
  acc_t* hpre[2];    // (hidden) per sample each, or null
  acc_t* gc;         // (C) per sample
  acc_t* maps;       // (2, H*W) per sample: channel mean and max of x * gc; null without the spatial gate
  int32_t* idx_c;    // (C) per sample: first arg-max position per channel, when ARG
  int32_t* idx_s;    // (H*W) per sample: first arg-max channel per position, when ARG and spatial
};

// Scratch elements bunch_gates needs for B samples.
int64_t gates_scratch(int64_t B, int64_t C, int64_t hidden) { return B * (2 * C + hidden); }

// The channel pools and channel gates of samples [lo, hi) of x, the pools from the last sample (after a pass in
// order, the part of the map read or written last is in the cache). With in_a (and in_b), the module's input is
// the affine map x * in_a[c] + in_b[c] of the tensor read (a BatchNorm folded in front of the module).
template <typename scalar_t, typename acc_t, bool ARG>
void bunch_gates(const scalar_t* x, const MapShape& s, int64_t lo, int64_t hi, const Mlp<acc_t>& mlp, bool avg,
                 bool max, const acc_t* in_a, const acc_t* in_b, const PoolsOut<acc_t>& o, acc_t* scratch) {
  const int64_t C = s.c, P = s.p(), R = s.rows(), K = s.cols(), B = hi - lo, Hd = mlp.hidden;
  const int n_pools = int(avg) + int(max);
  acc_t *sums = scratch, *spare_max = sums + B * C, *act = spare_max + B * C;  // (B, C), (B, C), (B, hidden)
  std::vector<const acc_t*> pooled(B * n_pools);
  std::vector<acc_t*> hpre(o.hpre[0] ? B * n_pools : 0), gc(B);
  for (int64_t i = B - 1; i >= 0; --i) {
    const int64_t n = lo + i, row = n - o.first;
    const scalar_t* xs = x + n * s.sample();
    int32_t* ic = ARG ? o.idx_c + row * C : nullptr;
    acc_t *sm = sums + i * C, *mx = max ? o.pooled[n_pools - 1] + row * C : spare_max + i * C;
    if (!in_a) {
      if (s.cl)
        sample_pool_cols<scalar_t, acc_t, ARG>(xs, Ident<acc_t>{}, R, K, sm, mx, ic);
      else
        sample_pool_rows<scalar_t, acc_t, ARG>(xs, Ident<acc_t>{}, R, K, sm, mx, ic);
    } else if (s.cl) {
      sample_pool_cols<scalar_t, acc_t, ARG>(xs, ColAffine<acc_t>{in_a, in_b}, R, K, sm, mx, ic);
    } else {
      sample_pool_rows<scalar_t, acc_t, ARG>(xs, RowAffine<acc_t>{in_a, in_b}, R, K, sm, mx, ic);
    }
    if (avg)
      for (int64_t c = 0; c < C; ++c) o.pooled[0][row * C + c] = sm[c] / static_cast<acc_t>(P);
    for (int p = 0; p < n_pools; ++p) {
      pooled[i * n_pools + p] = o.pooled[p] + row * C;
      if (o.hpre[0]) hpre[i * n_pools + p] = o.hpre[p] + row * Hd;
    }
    gc[i] = o.gc + row * C;
  }
  bunch_mlp(mlp, B, n_pools, pooled.data(), o.hpre[0] ? hpre.data() : nullptr, act, gc.data());
}

// The spatial pools of sample n (channel mean and max of x * gc, over C, into o.maps) and their arg-max channels.
// With a folded BatchNorm, coef (2C) is left holding its gated affine (gated_affine).
template <typename scalar_t, typename acc_t, bool ARG>
void sample_spatial_pools(const scalar_t* x, const MapShape& s, int64_t n, const acc_t* in_a, const acc_t* in_b,
                          const PoolsOut<acc_t>& o, acc_t* coef) {
  const int64_t C = s.c, P = s.p(), R = s.rows(), K = s.cols(), row = n - o.first;
  const scalar_t* xs = x + n * s.sample();
  const acc_t* gci = o.gc + row * C;
  acc_t *s_sum = o.maps + row * 2 * P, *s_max = s_sum + P;
  int32_t* is = ARG ? o.idx_s + row * P : nullptr;
  if (!in_a) {
    if (s.cl)
      sample_pool_rows<scalar_t, acc_t, ARG>(xs, ColScale<acc_t>{gci}, R, K, s_sum, s_max, is);
    else
      sample_pool_cols<scalar_t, acc_t, ARG>(xs, RowScale<acc_t>{gci}, R, K, s_sum, s_max, is);
  } else {
    gated_affine(in_a, in_b, gci, C, coef);
    if (s.cl)
      sample_pool_rows<scalar_t, acc_t, ARG>(xs, ColAffine<acc_t>{coef, coef + C}, R, K, s_sum, s_max, is);
    else
      sample_pool_cols<scalar_t, acc_t, ARG>(xs, RowAffine<acc_t>{coef, coef + C}, R, K, s_sum, s_max, is);
  }
  for (int64_t p = 0; p < P; ++p) s_sum[p] /= static_cast<acc_t>(C);
}

// Samples go through the passes a bunch of at most about kBunchBytes at a time (while they are in the cache), each
// thread its own samples (by_samples), or one bunch after the other with each pass split across threads.
int64_t bunch_size(const MapShape& s, int64_t elem_bytes) {
  return std::max<int64_t>(1, kBunchBytes / std::max<int64_t>(1, s.sample() * elem_bytes));
}

// fn(lo, hi) for bunches of the n samples, the last bunch first (see bunch_gates), in parallel over samples when
// by_samples(n).
template <typename F>
void for_bunches(int64_t n, int64_t bunch, const F& fn) {
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t hi = end; hi > begin; hi -= bunch) fn(std::max(begin, hi - bunch), hi);
  };
  if (by_samples(n))
    at::parallel_for(0, n, 1, run);
  else
    run(0, n);
}

// The optional affine (scale, shift) of a folded BatchNorm ("input": in front of the module; "residual": on the
// shortcut): both or neither, (C,) in the compute dtype.
std::pair<const void*, const void*> folded_affine(const std::optional<Tensor>& scale,
                                                  const std::optional<Tensor>& shift, const Tensor& x3, int64_t C,
                                                  const std::string& what = "input") {
  TORCH_CHECK(given(scale) == given(shift), "cbam_cpu: the ", what, " scale and shift come together");
  if (!given(scale)) return {nullptr, nullptr};
  check_acc(*scale, x3, {C}, (what + " scale").c_str());
  check_acc(*shift, x3, {C}, (what + " shift").c_str());
  return {scale->const_data_ptr(), shift->const_data_ptr()};
}

template <typename acc_t>
Mlp<acc_t> make_mlp(const Tensor& x, int64_t C, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                    const std::optional<Tensor>& b2) {
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, "cbam_cpu: fc1 weight must be [hidden, ", C, "], got ", w1.sizes());
  const int64_t Hd = w1.size(0);
  check_acc(w1, x, {Hd, C}, "fc1 weight");
  check_acc(w2, x, {C, Hd}, "fc2 weight");
  if (given(b1)) check_acc(*b1, x, {Hd}, "fc1 bias");
  if (given(b2)) check_acc(*b2, x, {C}, "fc2 bias");
  return {w1.const_data_ptr<acc_t>(), given(b1) ? b1->const_data_ptr<acc_t>() : nullptr,
          w2.const_data_ptr<acc_t>(), given(b2) ? b2->const_data_ptr<acc_t>() : nullptr, C, Hd};
}

// Training forward, first part: the channel pools, the channel gate and the spatial pools of every sample, with
// everything backward needs. Returns pooled (P, N, C), hpre (P, N, hidden), gc (N, C), maps (N, 2, H, W),
// idx_c (N, C) and idx_s (N, H*W) (the last two int32; maps and idx_s are empty without the spatial gate). With
// in_scale and in_shift (C,), the module's input is x * in_scale[c] + in_shift[c] (a folded BatchNorm). Without
// need_idx (no backward to come) the arg-max indices are not tracked and both come back empty.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> pools_and_channel_gate(
    const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
    const std::optional<Tensor>& b2, bool avg, bool max, bool spatial, const std::optional<Tensor>& in_scale,
    const std::optional<Tensor>& in_shift, bool need_idx) {
  const MapShape s = map_shape(x);
  const Tensor& x3 = s.t;
  TORCH_CHECK(avg || max, "cbam_cpu: at least one of the avg and max channel pools is needed");
  const int n_pools = int(avg) + int(max);
  const int64_t Hd = w1.size(0), N = s.n, C = s.c, P = s.p();
  Tensor pooled = new_acc(x3, {n_pools, N, C}), hpre = new_acc(x3, {n_pools, N, Hd}), gc = new_acc(x3, {N, C});
  Tensor maps = spatial ? new_acc(x3, {N, 2, s.h, s.w}) : new_acc(x3, {0});
  Tensor idx_c = need_idx ? new_index(x3, {N, C}) : new_index(x3, {0});
  Tensor idx_s = spatial && need_idx ? new_index(x3, {N, P}) : new_index(x3, {0});
  const auto in_ab = folded_affine(in_scale, in_shift, x3, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "pools_and_channel_gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Mlp<acc_t> mlp = make_mlp<acc_t>(x3, C, w1, b1, w2, b2);
    const scalar_t* xp = x3.const_data_ptr<scalar_t>();
    acc_t *pp = pooled.mutable_data_ptr<acc_t>(), *hp = hpre.mutable_data_ptr<acc_t>();
    const auto* in_a = static_cast<const acc_t*>(in_ab.first);
    const auto* in_b = static_cast<const acc_t*>(in_ab.second);
    const PoolsOut<acc_t> o{0,
                            {pp, pp + N * C},
                            {hp, hp + N * Hd},
                            gc.mutable_data_ptr<acc_t>(),
                            spatial ? maps.mutable_data_ptr<acc_t>() : nullptr,
                            need_idx ? idx_c.mutable_data_ptr<int32_t>() : nullptr,
                            spatial && need_idx ? idx_s.mutable_data_ptr<int32_t>() : nullptr};
    const int64_t bunch = bunch_size(s, sizeof(scalar_t));
    auto run = [&](auto arg) {  // arg-max tracking as a compile-time flag
      constexpr bool ARG = decltype(arg)::value;
      for_bunches(N, bunch, [&](int64_t lo, int64_t hi) {
        const int64_t gates = gates_scratch(hi - lo, C, Hd);
        std::vector<acc_t> scratch(gates + 2 * C);
        bunch_gates<scalar_t, acc_t, ARG>(xp, s, lo, hi, mlp, avg, max, in_a, in_b, o, scratch.data());
        for (int64_t n = lo; spatial && n < hi; ++n)  // in order: the first is the one pooled last
          sample_spatial_pools<scalar_t, acc_t, ARG>(xp, s, n, in_a, in_b, o, scratch.data() + gates);
      });
    };
    if (need_idx)
      run(std::true_type{});
    else
      run(std::false_type{});
  });
  return {pooled, hpre, gc, maps, idx_c, idx_s};
}

// Scratch elements of the inference path for B samples: bunch_gates' scratch, then per sample the pooled vectors,
// channel gate, the two spatial maps and the spatial gate; once, a folded BatchNorm's affine times a gate.
int64_t inference_scratch(int64_t B, int64_t C, int64_t hidden, int64_t P) {
  return gates_scratch(B, C, hidden) + B * (3 * C + 3 * P) + 2 * C;
}

// Samples [lo, hi) of the inference path, while they are in the caches: their channel gates (bunch_gates), then
// each sample's spatial pools, convolution, gate and output, from the one pooled last. Inside a parallel region
// (the caller runs samples in parallel) every pass runs on the calling thread; otherwise each pass splits the
// sample's rows. Either way the arithmetic, and so the result, is the same.
template <typename scalar_t, typename acc_t>
void bunch_inference(const scalar_t* x, const scalar_t* res, const acc_t* res_a, const acc_t* res_b, scalar_t* out,
                     const MapShape& s, int64_t lo, int64_t hi, const Mlp<acc_t>& mlp, bool avg, bool max,
                     const acc_t* in_a, const acc_t* in_b, const acc_t* conv_w, int64_t ks, acc_t bias, acc_t scale,
                     acc_t shift, bool stream, acc_t* scratch) {
  const int64_t C = s.c, P = s.p(), R = s.rows(), K = s.cols(), S = s.sample(), B = hi - lo;
  acc_t* pooled = scratch + gates_scratch(B, C, mlp.hidden);
  acc_t *gc = pooled + B * 2 * C, *maps = gc + B * C, *gs = maps + B * 2 * P, *coef = gs + B * P;
  const PoolsOut<acc_t> o{lo, {pooled, pooled + B * C}, {nullptr, nullptr}, gc, maps, nullptr, nullptr};
  bunch_gates<scalar_t, acc_t, false>(x, s, lo, hi, mlp, avg, max, in_a, in_b, o, scratch);
  for (int64_t i = 0; i < B; ++i) {
    const acc_t* gci = gc + i * C;
    acc_t* gsi = gs + i * P;
    if (conv_w) {
      sample_spatial_pools<scalar_t, acc_t, false>(x, s, lo + i, in_a, in_b, o, coef);
      sample_conv(maps + i * 2 * P, conv_w, ks, s.h, s.w, bias, gsi);
      for (int64_t p = 0; p < P; ++p) gsi[p] = sigmoid(gsi[p] * scale + shift);
    } else {
      std::fill(gsi, gsi + P, acc_t(1));
    }
    if (in_a && !conv_w) gated_affine(in_a, in_b, gci, C, coef);  // (the spatial pools left it there)
    const int64_t base = (lo + i) * S;
    const scalar_t* rs = res ? res + base : nullptr;
    for_range(R, K, [&](int64_t r) {
      gate_rows_any(x + base, gci, gsi, !s.cl, r, r + 1, K, rs, res_a, res_b, in_a ? coef : nullptr,
                    in_a ? coef + C : nullptr, out + base, stream);
    });
  }
}

// The whole module without gradients and without batch statistics, sample by sample (samples in parallel when
// there are a few per thread): pools, channel gate, spatial pools, convolution (weight (1, 2, k, k), bias), the
// affine normalisation z * norm_scale + norm_shift (a folded BatchNorm; both 1-element tensors), sigmoid, and the
// gated output. Without a convolution weight the channel gate alone is applied; with a residual,
// relu(out + residual) is returned. With in_scale and in_shift (C,), the module's input is x * in_scale[c] +
// in_shift[c] (a folded BatchNorm); with res_scale and res_shift (C,), the residual is residual * res_scale[c] +
// res_shift[c] (the folded BatchNorm of a downsampling shortcut).
//
// With into_x, the output goes into x itself where it can (x dense in either layout and not overlapping the
// residual): each element is read before it is written, at the same place, so the passes are unchanged, and the
// output pass writes lines that are already in the cache, as a compiled plain network's BatchNorm, addition and
// ReLU do on its convolution's output. Elsewhere a new tensor is returned.
Tensor inference(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                 const std::optional<Tensor>& b2, bool avg, bool max, const std::optional<Tensor>& conv_weight,
                 const std::optional<Tensor>& conv_bias, const Tensor& norm_scale, const Tensor& norm_shift,
                 const std::optional<Tensor>& residual, const std::optional<Tensor>& in_scale,
                 const std::optional<Tensor>& in_shift, const std::optional<Tensor>& res_scale,
                 const std::optional<Tensor>& res_shift, bool into_x) {
  const MapShape s = map_shape(x);
  const Tensor& x3 = s.t;
  const Tensor res = given(residual) ? s.like(*residual, "the residual") : Tensor();
  TORCH_CHECK(avg || max, "cbam_cpu: at least one of the avg and max channel pools is needed");
  const bool spatial = given(conv_weight);
  // (the operator is layout-flexible, so under torch.compile a channels-last model's 4-D weight comes as it is)
  const Tensor cw = spatial ? conv_weight->contiguous() : Tensor();
  const int64_t ks = spatial ? cw.size(-1) : 0;
  if (spatial) {
    check_acc(cw, x3, {1, 2, ks, ks}, "conv weight");
    TORCH_CHECK(ks % 2 == 1, "cbam_cpu: the spatial kernel size must be odd, got ", ks);
    if (given(conv_bias)) check_acc(*conv_bias, x3, {1}, "conv bias");
  }
  check_acc(norm_scale, x3, {1}, "norm scale");
  check_acc(norm_shift, x3, {1}, "norm shift");
  const auto in_ab = folded_affine(in_scale, in_shift, x3, s.c);
  const auto res_ab = folded_affine(res_scale, res_shift, x3, s.c, "residual");
  TORCH_CHECK(res.defined() || !res_ab.first, "cbam_cpu: a residual scale and shift need a residual");
  const bool in_place =
      into_x && x3.is_same(x) && (!res.defined() || at::get_overlap_status(x3, res) == at::MemOverlapStatus::No);
  Tensor out = in_place ? x3 : at::empty_like(x3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "forward_inference", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Mlp<acc_t> mlp = make_mlp<acc_t>(x3, s.c, w1, b1, w2, b2);
    const scalar_t* xp = x3.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* wp = spatial ? cw.const_data_ptr<acc_t>() : nullptr;
    const acc_t bias = given(conv_bias) ? conv_bias->const_data_ptr<acc_t>()[0] : acc_t(0);
    const acc_t scale = norm_scale.const_data_ptr<acc_t>()[0], shift = norm_shift.const_data_ptr<acc_t>()[0];
    const bool stream = !in_place && stream_output(out);  // (x's lines are in the cache, just read)
    const acc_t *in_a = static_cast<const acc_t*>(in_ab.first), *in_b = static_cast<const acc_t*>(in_ab.second);
    const acc_t *res_a = static_cast<const acc_t*>(res_ab.first), *res_b = static_cast<const acc_t*>(res_ab.second);
    for_bunches(s.n, bunch_size(s, sizeof(scalar_t)), [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> scratch(inference_scratch(hi - lo, s.c, mlp.hidden, s.p()));
      bunch_inference<scalar_t, acc_t>(xp, rp, res_a, res_b, op, s, lo, hi, mlp, avg, max, in_a, in_b, wp, ks, bias,
                                       scale, shift, stream, scratch.data());
    });
  });
  return out;
}

Tensor forward_inference(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                         const std::optional<Tensor>& b2, bool avg, bool max, const std::optional<Tensor>& conv_weight,
                         const std::optional<Tensor>& conv_bias, const Tensor& norm_scale, const Tensor& norm_shift,
                         const std::optional<Tensor>& residual, const std::optional<Tensor>& in_scale,
                         const std::optional<Tensor>& in_shift, const std::optional<Tensor>& res_scale,
                         const std::optional<Tensor>& res_shift) {
  return inference(x, w1, b1, w2, b2, avg, max, conv_weight, conv_bias, norm_scale, norm_shift, residual, in_scale,
                   in_shift, res_scale, res_shift, false);
}

// forward_inference with the result written into x (for a caller that does not need x afterwards: a block's
// convolution output).
void forward_inference_(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                        const std::optional<Tensor>& b2, bool avg, bool max, const std::optional<Tensor>& conv_weight,
                        const std::optional<Tensor>& conv_bias, const Tensor& norm_scale, const Tensor& norm_shift,
                        const std::optional<Tensor>& residual, const std::optional<Tensor>& in_scale,
                        const std::optional<Tensor>& in_shift, const std::optional<Tensor>& res_scale,
                        const std::optional<Tensor>& res_shift) {
  const Tensor out = inference(x, w1, b1, w2, b2, avg, max, conv_weight, conv_bias, norm_scale, norm_shift, residual,
                               in_scale, in_shift, res_scale, res_shift, true);
  if (!out.is_same(x)) x.copy_(out);  // (x strided, or overlapping the residual)
}

// out = (x * chan) * pos for a batch, chan (N, C) and pos (N, H*W); with a residual, relu(out + residual); with
// in_scale and in_shift (C,), x * in_scale[c] + in_shift[c] in place of x.
Tensor gate(const Tensor& x, const Tensor& chan, const Tensor& pos, const std::optional<Tensor>& residual,
            const std::optional<Tensor>& in_scale, const std::optional<Tensor>& in_shift) {
  const MapShape s = map_shape(x);
  const Tensor& x3 = s.t;
  check_acc(chan, x3, {s.n, s.c}, "chan");
  check_acc(pos, x3, {s.n, s.p()}, "pos");
  const Tensor res = given(residual) ? s.like(*residual, "the residual") : Tensor();
  const auto in_ab = folded_affine(in_scale, in_shift, x3, s.c);
  Tensor out = at::empty_like(x3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x3.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t *cp = chan.const_data_ptr<acc_t>(), *pp = pos.const_data_ptr<acc_t>();
    const int64_t R = s.rows(), K = s.cols(), C = s.c, P = s.p(), S = s.sample();
    const bool stream = stream_output(out);
    const acc_t *in_a = static_cast<const acc_t*>(in_ab.first), *in_b = static_cast<const acc_t*>(in_ab.second);
    std::vector<acc_t> coef(in_a ? s.n * 2 * C : 0);  // (N, 2, C): a folded BatchNorm's affine times the gate
    for (int64_t n = 0; in_a && n < s.n; ++n) gated_affine(in_a, in_b, cp + n * C, C, coef.data() + n * 2 * C);
    for_range(s.n * R, K, [&](int64_t i) {
      const int64_t n = i / R, r = i % R;
      const scalar_t* rs = rp ? rp + n * S : nullptr;
      const acc_t* ca = in_a ? coef.data() + n * 2 * C : nullptr;
      gate_rows_any<scalar_t, acc_t>(xp + n * S, cp + n * C, pp + n * P, !s.cl, r, r + 1, K, rs, nullptr, nullptr,
                                     ca, in_a ? ca + C : nullptr, op + n * S, stream);
    });
  });
  return out;
}

// The k x k convolution of the pooled maps (N, 2, H, W) with a (1, 2, k, k) weight, plus an optional bias.
Tensor spatial_conv(const Tensor& maps, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(maps.dim() == 4 && maps.size(1) == 2 && maps.is_contiguous() && maps.device().is_cpu(),
              "cbam_cpu: maps must be a contiguous (N, 2, H, W) CPU tensor, got ", maps.sizes());
  const int64_t N = maps.size(0), H = maps.size(2), W = maps.size(3), ks = weight.size(-1);
  TORCH_CHECK(ks % 2 == 1 && weight.sizes() == at::IntArrayRef({1, 2, ks, ks}) && weight.is_contiguous() &&
                  weight.scalar_type() == maps.scalar_type(),
              "cbam_cpu: weight must be a contiguous (1, 2, k, k) tensor with odd k, of the maps' dtype");
  Tensor out = at::empty({N, 1, H, W}, maps.options());
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "spatial_conv", [&] {
    const scalar_t *mp = maps.const_data_ptr<scalar_t>(), *wp = weight.const_data_ptr<scalar_t>();
    const scalar_t b = given(bias) ? bias->to(maps.scalar_type()).const_data_ptr<scalar_t>()[0] : scalar_t(0);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_samples(N, [&](int64_t n) { sample_conv(mp + n * 2 * H * W, wp, ks, H, W, b, op + n * H * W); });
  });
  return out;
}

// Gradients of spatial_conv (without its bias) for the output gradient d (N, 1, H, W): d_maps and d_weight.
std::tuple<Tensor, Tensor> spatial_conv_backward(const Tensor& d, const Tensor& maps, const Tensor& weight) {
  TORCH_CHECK(maps.dim() == 4 && maps.size(1) == 2 && maps.is_contiguous(), "cbam_cpu: maps must be (N, 2, H, W)");
  const int64_t N = maps.size(0), H = maps.size(2), W = maps.size(3), ks = weight.size(-1);
  TORCH_CHECK(d.sizes() == at::IntArrayRef({N, 1, H, W}) && d.is_contiguous() && d.scalar_type() == maps.scalar_type(),
              "cbam_cpu: d must be a contiguous (N, 1, H, W) tensor of the maps' dtype");
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({1, 2, ks, ks}) && weight.is_contiguous() &&
                  weight.scalar_type() == maps.scalar_type(),
              "cbam_cpu: weight must be a contiguous (1, 2, k, k) tensor of the maps' dtype");
  Tensor d_maps = at::empty_like(maps);
  Tensor partial = at::zeros({N, 2 * ks * ks}, maps.options());
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "spatial_conv_backward", [&] {
    const scalar_t *dp = d.const_data_ptr<scalar_t>(), *mp = maps.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t *gp = d_maps.mutable_data_ptr<scalar_t>(), *pp = partial.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> flipped(2 * ks * ks);  // [2][1][k][k]: the input gradient correlates d with these
    for (int64_t ch = 0; ch < 2; ++ch)
      for (int64_t t = 0; t < ks * ks; ++t) flipped[ch * ks * ks + t] = wp[ch * ks * ks + ks * ks - 1 - t];
    for_samples(N, [&](int64_t n) {
      correlate(dp + n * H * W, 1, flipped.data(), 2, ks, H, W, scalar_t(0), gp + n * 2 * H * W);
      // weight gradient of this sample: tap (ch, dy, dx) sums d[y, x] * map[ch][y + dy - pad, x + dx - pad]
      constexpr int V = kWidth<scalar_t>;
      using Vc = Vec<scalar_t>;
      Padded<scalar_t> m(mp + n * 2 * H * W, 2, ks, H, W);
      std::vector<scalar_t> drow(m.Wv, scalar_t(0));
      std::vector<Vc> acc(2 * ks * ks, Vc{});
      for (int64_t y = 0; y < H; ++y) {
        std::copy(dp + (n * H + y) * W, dp + (n * H + y + 1) * W, drow.begin());
        for (int64_t ch = 0; ch < 2; ++ch) {
          for (int64_t dy = 0; dy < ks; ++dy) {
            const scalar_t* src = m.row(ch, y + dy);
            for (int64_t dx = 0; dx < ks; ++dx) {
              Vc a = acc[(ch * ks + dy) * ks + dx];
              for (int64_t x = 0; x < m.Wv; x += V) a += vload<scalar_t>(drow.data() + x) * vload<scalar_t>(src + x + dx);
              acc[(ch * ks + dy) * ks + dx] = a;
            }
          }
        }
      }
      for (int64_t t = 0; t < 2 * ks * ks; ++t) pp[n * 2 * ks * ks + t] = hsum<scalar_t>(acc[t]);
    });
  });
  Tensor d_weight = partial.select(0, 0).clone();
  for (int64_t n = 1; n < N; ++n) d_weight.add_(partial.select(0, n));
  return {d_maps, d_weight.view({1, 2, ks, ks})};
}

// ------------------------------------------------------------------------------------------------ backward sums
// t = f(a) * b (or f(a) alone, f an element transform). rows[r] = sum_k t * colv[k] (when ROWS); cols[k] =
// sum_r t * rowv[r] (when COLS).
template <typename scalar_t, typename acc_t, bool HAS_B, bool ROWS, bool COLS, typename F>
void cross_block(const scalar_t* a, const scalar_t* b, const F& f, const acc_t* rowv, const acc_t* colv, int64_t K,
                 int64_t r0, int64_t r1, int64_t k0, int64_t k1, acc_t* rows, acc_t* cols) {
  constexpr int W = kWidth<acc_t>;
  using V = Vec<acc_t>;
  const int64_t len = k1 - k0;
  if constexpr (COLS) std::fill(cols, cols + len, acc_t(0));
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* ar = a + r * K + k0;
    const scalar_t* br = HAS_B ? b + r * K + k0 : nullptr;
    const acc_t rv = COLS ? rowv[r] : acc_t(0);
    const acc_t* cv = ROWS ? colv + k0 : nullptr;
    const auto fr = f.row(r);
    V lanes{};
    int64_t j = 0;
    for (; j + W <= len; j += W) {
      V t = fr.vec(vload<acc_t>(ar + j), k0 + j);
      if constexpr (HAS_B) t *= vload<acc_t>(br + j);
      if constexpr (ROWS) lanes += t * vload<acc_t>(cv + j);
      if constexpr (COLS) vstore<acc_t>(cols + j, vload<acc_t>(cols + j) + t * rv);
    }
    acc_t tail = 0;
    for (; j < len; ++j) {
      acc_t t = fr.one(static_cast<acc_t>(ar[j]), k0 + j);
      if constexpr (HAS_B) t *= static_cast<acc_t>(br[j]);
      if constexpr (ROWS) tail += t * cv[j];
      if constexpr (COLS) cols[j] += t * rv;
    }
    if constexpr (ROWS) rows[r] = hsum<acc_t>(lanes) + tail;
  }
}

// Block partial sums (N, blocks, ...), added in block order.
Tensor combine_blocks(const Tensor& partial) {
  Tensor total = partial.select(1, 0).clone();
  for (int64_t i = 1; i < partial.size(1); ++i) total.add_(partial.select(1, i));
  return total;
}

// rows and / or cols of cross_block over a batch. shift (optional, compute dtype) is added to a first: per row
// (length R) or per column (length K) as shift_rows says.
template <bool HAS_B, bool ROWS, bool COLS>
std::tuple<Tensor, Tensor> cross_impl(const Tensor& a, const Tensor& b, const Tensor& rowv, const Tensor& colv,
                                      const Tensor& shift = Tensor(), bool shift_rows = false) {
  check_map(a, "a");
  const int64_t N = a.size(0), R = a.size(1), K = a.size(2);
  if constexpr (HAS_B) {
    check_map(b, "b");
    TORCH_CHECK(b.sizes() == a.sizes() && b.scalar_type() == a.scalar_type(), "cbam_cpu: a and b must match");
  }
  if constexpr (COLS) check_acc(rowv, a, {N, R}, "rowv");
  if constexpr (ROWS) check_acc(colv, a, {N, K}, "colv");
  const Split s = make_split(N, R, K);
  Tensor rows = ROWS ? new_acc(a, {N, s.k_blocks, R}) : Tensor();
  Tensor cols = COLS ? new_acc(a, {N, s.r_blocks, K}) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = HAS_B ? b.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* rvp = COLS ? rowv.const_data_ptr<acc_t>() : nullptr;
    const acc_t* cvp = ROWS ? colv.const_data_ptr<acc_t>() : nullptr;
    acc_t* rowsp = ROWS ? rows.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* colsp = COLS ? cols.mutable_data_ptr<acc_t>() : nullptr;
    auto run = [&](const auto& f) {
      for_blocks(s, [&](int64_t n, int64_t rb, int64_t kb, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
        const int64_t base = n * R * K;
        cross_block<scalar_t, acc_t, HAS_B, ROWS, COLS>(
            ap + base, HAS_B ? bp + base : nullptr, f, COLS ? rvp + n * R : nullptr, ROWS ? cvp + n * K : nullptr, K,
            r0, r1, k0, k1, ROWS ? rowsp + (n * s.k_blocks + kb) * R : nullptr,
            COLS ? colsp + (n * s.r_blocks + rb) * K + k0 : nullptr);
      });
    };
    if (!shift.defined()) {
      run(Ident<acc_t>{});
    } else {
      check_acc(shift, a, {shift_rows ? R : K}, "shift");
      const acc_t* sp = shift.const_data_ptr<acc_t>();
      if (shift_rows)
        run(RowShift<acc_t>{sp});
      else
        run(ColShift<acc_t>{sp});
    }
  });
  return {ROWS ? combine_blocks(rows) : Tensor(), COLS ? combine_blocks(cols) : Tensor()};
}

// The dense (N, R, K) view of a map laid out as s.
Tensor rows_view(const MapShape& s, const Tensor& t) {
  return t.as_strided({s.n, s.rows(), s.cols()}, {s.sample(), s.cols(), 1});
}

// One pass over dout and x: d_chan[n, c] = sum_p dout * x * pos[p] and d_pos[n, p] = sum_c dout * x * chan[c].
std::tuple<Tensor, Tensor> cross_sums(const Tensor& dout, const Tensor& x, const Tensor& chan, const Tensor& pos) {
  const MapShape s = map_shape(x);
  const Tensor d = s.like(dout, "dout");
  if (s.cl) {  // rows are positions
    auto [d_pos, d_chan] = cross_impl<true, true, true>(rows_view(s, d), rows_view(s, s.t), pos, chan);
    return {d_chan, d_pos};
  }
  return cross_impl<true, true, true>(rows_view(s, d), rows_view(s, s.t), chan, pos);
}

// Batch statistics of a BatchNorm folded in front of the module, from one read of y: per channel, the sums of
// y - pivot and (y - pivot)^2 over the batch and positions, pivot = the channel's first element (close to the
// channel's mean for any sensible map, so the variance is not lost to cancellation). Rows of a block: per-row sums
// (NCHW) or per-column sums accumulated across the block's rows (channels-last).
template <typename scalar_t, typename acc_t, bool CHAN_IS_ROW>
void stats_block(const scalar_t* y, const acc_t* pivot, int64_t R, int64_t K, int64_t r0, int64_t r1, int64_t k0,
                 int64_t k1, acc_t* rows, acc_t* cols) {
  constexpr int W = kWidth<acc_t>;
  using V = Vec<acc_t>;
  const int64_t len = k1 - k0;
  if constexpr (!CHAN_IS_ROW) std::fill(cols, cols + len, acc_t(0)), std::fill(cols + K, cols + K + len, acc_t(0));
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* yr = y + r * K + k0;
    if constexpr (CHAN_IS_ROW) {
      const acc_t p = pivot[r];
      V s1{}, s2{};
      int64_t j = 0;
      for (; j + W <= len; j += W) {
        const V z = vload<acc_t>(yr + j) - p;
        s1 += z, s2 += z * z;
      }
      acc_t t1 = hsum<acc_t>(s1), t2 = hsum<acc_t>(s2);
      for (; j < len; ++j) {
        const acc_t z = static_cast<acc_t>(yr[j]) - p;
        t1 += z, t2 += z * z;
      }
      rows[r] = t1, rows[R + r] = t2;
    } else {
      const acc_t* p = pivot + k0;
      acc_t *c1 = cols, *c2 = cols + K;
      int64_t j = 0;
      for (; j + W <= len; j += W) {
        const V z = vload<acc_t>(yr + j) - vload<acc_t>(p + j);
        vstore<acc_t>(c1 + j, vload<acc_t>(c1 + j) + z);
        vstore<acc_t>(c2 + j, vload<acc_t>(c2 + j) + z * z);
      }
      for (; j < len; ++j) {
        const acc_t z = static_cast<acc_t>(yr[j]) - p[j];
        c1[j] += z, c2[j] += z * z;
      }
    }
  }
}

// Per-channel batch mean and biased variance of a map (what BatchNorm normalises with in training), in the
// compute dtype; the sums are combined in a fixed order (independent of the thread count).
std::tuple<Tensor, Tensor> channel_stats(const Tensor& y) {
  const MapShape s = map_shape(y, "y");
  const int64_t N = s.n, C = s.c, R = s.rows(), K = s.cols();
  const Split sp = make_split(N, R, K);
  const int64_t blocks = s.cl ? sp.r_blocks : sp.k_blocks;  // partial sums per sample
  Tensor partial = new_acc(s.t, {N, blocks, 2, C});
  Tensor mean = new_acc(s.t, {C}), var = new_acc(s.t, {C});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.t.scalar_type(), "channel_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = s.t.const_data_ptr<scalar_t>();
    std::vector<acc_t> pivot(C);
    for (int64_t c = 0; c < C; ++c) pivot[c] = static_cast<acc_t>(yp[s.cl ? c : c * K]);
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    const int64_t S = s.sample();
    for_blocks(sp, [&](int64_t n, int64_t rb, int64_t kb, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
      if (s.cl)
        stats_block<scalar_t, acc_t, false>(yp + n * S, pivot.data(), R, K, r0, r1, k0, k1, nullptr,
                                            pp + (n * blocks + rb) * 2 * K + k0);
      else
        stats_block<scalar_t, acc_t, true>(yp + n * S, pivot.data(), R, K, r0, r1, k0, k1,
                                           pp + (n * blocks + kb) * 2 * R, nullptr);
    });
    // combined sample by sample, block by block: a fixed order
    const acc_t count = static_cast<acc_t>(N * s.p());
    acc_t *mp = mean.mutable_data_ptr<acc_t>(), *vp = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      acc_t s1 = 0, s2 = 0;
      for (int64_t i = 0; i < N * blocks; ++i) s1 += pp[(i * 2) * C + c], s2 += pp[(i * 2 + 1) * C + c];
      const acc_t shift = s1 / count;
      mp[c] = pivot[c] + shift;
      vp[c] = std::max(s2 / count - shift * shift, acc_t(0));
    }
  });
  return {mean, var};
}

// The cross sums of a module whose input is x = y * in_scale[c] + in_shift[c] (a BatchNorm folded in front of it),
// from one read of dout and y, for one block. With z = y - center[c] and chan_a = in_scale * gc, chan_b =
// in_shift * gc (per sample and channel):
//   per channel:  sum_p dout * pos[p] * z,  sum_p dout * pos[p],  sum_p z   (three sums)
//   per position: sum_c dout * (y * chan_a[c] + chan_b[c])                     (= sum_c dout * x * gc)
// Channels are rows in NCHW (CHAN_IS_ROW) and columns in channels-last. rows: [sums][R] partials of this column
// block; cols: [sums][K] partials of this row block (from column k0).
template <typename scalar_t, typename acc_t, bool CHAN_IS_ROW>
void affine_cross_block(const scalar_t* d, const scalar_t* y, const acc_t* pos, const acc_t* ca, const acc_t* cb,
                        const acc_t* ctr, int64_t R, int64_t K, int64_t r0, int64_t r1, int64_t k0, int64_t k1,
                        acc_t* rows, acc_t* cols) {
  constexpr int W = kWidth<acc_t>;
  using V = Vec<acc_t>;
  const int64_t len = k1 - k0;
  const int64_t n_cols = CHAN_IS_ROW ? 1 : 3;
  for (int64_t q = 0; q < n_cols; ++q) std::fill(cols + q * K, cols + q * K + len, acc_t(0));
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* dr = d + r * K + k0;
    const scalar_t* yr = y + r * K + k0;
    if constexpr (CHAN_IS_ROW) {  // row r is channel r
      const acc_t c0 = ctr[r], a = ca[r], b = cb[r];
      const acc_t* g = pos + k0;
      acc_t* dp = cols;
      V t{}, u{}, zs{};
      int64_t j = 0;
      for (; j + W <= len; j += W) {
        const V dv = vload<acc_t>(dr + j), yv = vload<acc_t>(yr + j);
        const V z = yv - c0, dg = dv * vload<acc_t>(g + j);
        t += dg * z, u += dg, zs += z;
        vstore<acc_t>(dp + j, vload<acc_t>(dp + j) + dv * (yv * a + b));
      }
      acc_t tt = hsum<acc_t>(t), uu = hsum<acc_t>(u), zz = hsum<acc_t>(zs);
      for (; j < len; ++j) {
        const acc_t dv = static_cast<acc_t>(dr[j]), yv = static_cast<acc_t>(yr[j]);
        const acc_t z = yv - c0, dg = dv * g[j];
        tt += dg * z, uu += dg, zz += z;
        dp[j] += dv * (yv * a + b);
      }
      rows[r] = tt, rows[R + r] = uu, rows[2 * R + r] = zz;
    } else {  // row r is position r, columns are channels
      const acc_t g = pos[r];
      const acc_t *c0 = ctr + k0, *a = ca + k0, *b = cb + k0;
      acc_t *ct = cols, *cu = cols + K, *cz = cols + 2 * K;
      V lanes{};
      int64_t j = 0;
      for (; j + W <= len; j += W) {
        const V dv = vload<acc_t>(dr + j), yv = vload<acc_t>(yr + j);
        const V z = yv - vload<acc_t>(c0 + j), dg = dv * g;
        vstore<acc_t>(ct + j, vload<acc_t>(ct + j) + dg * z);
        vstore<acc_t>(cu + j, vload<acc_t>(cu + j) + dg);
        vstore<acc_t>(cz + j, vload<acc_t>(cz + j) + z);
        lanes += dv * (yv * vload<acc_t>(a + j) + vload<acc_t>(b + j));
      }
      acc_t tail = 0;
      for (; j < len; ++j) {
        const acc_t dv = static_cast<acc_t>(dr[j]), yv = static_cast<acc_t>(yr[j]);
        const acc_t z = yv - c0[j], dg = dv * g;
        ct[j] += dg * z, cu[j] += dg, cz[j] += z;
        tail += dv * (yv * a[j] + b[j]);
      }
      rows[r] = hsum<acc_t>(lanes) + tail;
    }
  }
}

// affine_cross_block over a batch: returns chan_sums (N, 3, C) and d_pos (N, H*W).
std::tuple<Tensor, Tensor> affine_cross_sums(const Tensor& dout, const Tensor& y, const Tensor& pos,
                                             const Tensor& chan_a, const Tensor& chan_b, const Tensor& center) {
  const MapShape s = map_shape(y, "y");
  const Tensor d = s.like(dout, "dout");
  const int64_t N = s.n, C = s.c, P = s.p(), R = s.rows(), K = s.cols();
  check_acc(pos, s.t, {N, P}, "pos");
  check_acc(chan_a, s.t, {N, C}, "chan_a");
  check_acc(chan_b, s.t, {N, C}, "chan_b");
  check_acc(center, s.t, {C}, "center");
  const Split sp = make_split(N, R, K);
  const int64_t n_rows = s.cl ? 1 : 3, n_cols = s.cl ? 3 : 1;
  Tensor rows = new_acc(s.t, {N, sp.k_blocks, n_rows, R}), cols = new_acc(s.t, {N, sp.r_blocks, n_cols, K});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.t.scalar_type(), "affine_cross_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *dp = d.const_data_ptr<scalar_t>(), *yp = s.t.const_data_ptr<scalar_t>();
    const acc_t *pp = pos.const_data_ptr<acc_t>(), *ap = chan_a.const_data_ptr<acc_t>();
    const acc_t *bp = chan_b.const_data_ptr<acc_t>(), *cp = center.const_data_ptr<acc_t>();
    acc_t *rp = rows.mutable_data_ptr<acc_t>(), *colp = cols.mutable_data_ptr<acc_t>();
    const int64_t S = s.sample();
    for_blocks(sp, [&](int64_t n, int64_t rb, int64_t kb, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
      acc_t* rows_at = rp + (n * sp.k_blocks + kb) * n_rows * R;
      acc_t* cols_at = colp + (n * sp.r_blocks + rb) * n_cols * K + k0;
      if (s.cl)
        affine_cross_block<scalar_t, acc_t, false>(dp + n * S, yp + n * S, pp + n * P, ap + n * C, bp + n * C, cp, R,
                                                   K, r0, r1, k0, k1, rows_at, cols_at);
      else
        affine_cross_block<scalar_t, acc_t, true>(dp + n * S, yp + n * S, pp + n * P, ap + n * C, bp + n * C, cp, R,
                                                  K, r0, r1, k0, k1, rows_at, cols_at);
    });
  });
  const Tensor per_row = combine_blocks(rows), per_col = combine_blocks(cols);  // (N, sums, R), (N, sums, K)
  return s.cl ? std::make_tuple(per_col, per_row.view({N, P})) : std::make_tuple(per_row, per_col.view({N, P}));
}

// d_chan[n, c] = sum_p x * pos_weight[p] + sum over the positions p whose arg-max channel is c of x * pos_max[p]
// (the two spatial maps' terms of the channel gate's gradient). With center (C,), x - center[c] in place of x.
Tensor channel_weighted_sum(const Tensor& x, const Tensor& pos_weight, const Tensor& pos_arg, const Tensor& pos_max,
                            const std::optional<Tensor>& center) {
  const MapShape s = map_shape(x);
  const Tensor x3 = rows_view(s, s.t);
  const Tensor shift = given(center) ? center->neg() : Tensor();
  Tensor out = s.cl ? std::get<1>(cross_impl<false, false, true>(x3, Tensor(), pos_weight, Tensor(), shift, false))
                    : std::get<0>(cross_impl<false, true, false>(x3, Tensor(), Tensor(), pos_weight, shift, true));
  const int64_t N = s.n, C = s.c, P = s.p(), S = s.sample();
  TORCH_CHECK(pos_arg.scalar_type() == at::kInt && pos_arg.is_contiguous() && pos_arg.sizes() == at::IntArrayRef({N, P}),
              "cbam_cpu: pos_arg must be a contiguous int32 (N, H*W) tensor");
  check_acc(pos_max, x3, {N, P}, "pos_max");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "channel_weighted_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = s.t.const_data_ptr<scalar_t>();
    const int32_t* ap = pos_arg.const_data_ptr<int32_t>();
    const acc_t* mp = pos_max.const_data_ptr<acc_t>();
    const acc_t* cp = shift.defined() ? center->const_data_ptr<acc_t>() : nullptr;
    acc_t* op = out.mutable_data_ptr<acc_t>();
    for_samples(N, [&](int64_t n) {  // sparse: one element per position
      for (int64_t p = 0; p < P; ++p) {
        const int64_t c = ap[n * P + p];
        const acc_t v = static_cast<acc_t>(xp[n * S + (s.cl ? p * C + c : c * P + p)]) - (cp ? cp[c] : acc_t(0));
        op[n * C + c] += v * mp[n * P + p];
      }
    });
  });
  return out;
}

// The input gradient, written once:
//   dx[c, p] = (d[c, p] * pos_mul[p] + pos_add[p] + (c == pos_arg[p] ? pos_max[p] : 0)) * chan_mul[c] + chan_add[c]
//              + (p == chan_arg[c] ? chan_max[c] : 0)
// with per-position (N, H*W) and per-channel (N, C) vectors: for CBAM, the spatial gate, the average map's
// gradient / C, the max map's gradient routed to its arg-max channel, the channel gate, the average pool's
// gradient / (H*W) and the max pool's gradient routed to its arg-max position. The arg-max terms are optional.
// With YT, + y_mul[c] * (y[c, p] - center[c]) (the batch-statistics term of a BatchNorm folded in front).
// Per sample, the columns of each row that receive one max pool's gradient: the max term whose arg-max runs along
// the rows (the spatial max map's channel in NCHW, the channel max pool's position in channels-last) touches one
// element per column, so a row gets a short list instead of a comparison in every vector (measured: the compare
// doubled the pass). offsets (N, R + 1), cols (N, L) in ascending order within a row; values (N, L) by column.
template <typename acc_t>
struct RowLists {
  const int32_t* offsets = nullptr;
  const int32_t* cols = nullptr;
  const acc_t* values = nullptr;
  int64_t R = 0, L = 0;
};

// The lists of rows keyed by keys (N, L) (the row each column's term goes to): a counting sort per sample.
std::pair<Tensor, Tensor> row_lists(const Tensor& keys, int64_t R) {
  const int64_t N = keys.size(0), L = keys.size(1);
  const int32_t* kp = keys.const_data_ptr<int32_t>();
  for (int64_t j = 0; j < N * L; ++j)
    TORCH_CHECK(kp[j] >= 0 && kp[j] < R, "cbam_cpu: an arg-max index is out of range: ", kp[j], " (", R, " rows)");
  Tensor offsets = at::empty({N, R + 1}, keys.options()), cols = at::empty({N, L}, keys.options());
  int32_t *op = offsets.mutable_data_ptr<int32_t>(), *cp = cols.mutable_data_ptr<int32_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> next(R);
    for (int64_t n = begin; n < end; ++n) {
      int32_t* off = op + n * (R + 1);
      const int32_t* key = kp + n * L;
      std::fill(off, off + R + 1, 0);
      for (int64_t j = 0; j < L; ++j) ++off[key[j] + 1];
      for (int64_t r = 0; r < R; ++r) off[r + 1] += off[r];
      std::copy(off, off + R, next.begin());
      for (int64_t j = 0; j < L; ++j) cp[n * L + next[key[j]]++] = static_cast<int32_t>(j);
    }
  });
  return {offsets, cols};
}

// One row of the input gradient: dense values from vec / one_acc (acc_t), plus the row's list of max-pool terms
// (each value times mult). write_row asks for the columns in ascending order, so a cursor walks the sorted list
// alongside: one comparison per vector, and a lane update where a listed column falls.
template <typename scalar_t, typename acc_t, typename FV, typename F1>
inline void write_grad_row(scalar_t* out, int64_t K, bool stream, const FV& vec, const F1& one_acc,
                           const RowLists<acc_t>& lists, int64_t n, int64_t r, acc_t mult) {
  constexpr int W = kWidth<acc_t>;
  const int32_t* off = lists.offsets ? lists.offsets + n * (lists.R + 1) + r : nullptr;
  if (!off || off[0] == off[1]) {
    write_row<scalar_t, acc_t>(out, K, stream, vec, [&](int64_t k) { return static_cast<scalar_t>(one_acc(k)); });
    return;
  }
  const int32_t* cols = lists.cols + n * lists.L;
  const acc_t* values = lists.values + n * lists.L;
  int32_t j = off[0];
  const int32_t end = off[1];
  write_row<scalar_t, acc_t>(
      out, K, stream,
      [&](int64_t k) {
        Vec<acc_t> v = vec(k);
        for (; j < end && cols[j] < k + W; ++j) v[cols[j] - k] += values[cols[j]] * mult;
        return v;
      },
      [&](int64_t k) {
        acc_t a = one_acc(k);
        for (; j < end && cols[j] == k; ++j) a += values[cols[j]] * mult;
        return static_cast<scalar_t>(a);
      });
}

template <typename scalar_t, typename acc_t, bool POS_MAX, bool CHAN_MAX, bool YT>
void input_grad_rows(const scalar_t* dp, scalar_t* op, int64_t N, int64_t R, int64_t K, bool channels_last,
                     const acc_t* pm, const acc_t* pa, const int32_t* parg, const acc_t* pmax, const acc_t* cm,
                     const acc_t* ca, const int32_t* carg, const acc_t* cmax, const scalar_t* yp, const acc_t* ym,
                     const acc_t* yc, const RowLists<acc_t>& lists, bool stream) {
  // POS_MAX / CHAN_MAX: the max terms computed in the dense pass (each a comparison with the row's own index);
  // lists: the other one (the spatial max map's in NCHW, times the row's channel gate; the channel max pool's in
  // channels-last)
  using V = Vec<acc_t>;
  using M = Mask<acc_t>;
  using I = Lane<acc_t>;
  const int64_t P = channels_last ? R : K, C = channels_last ? K : R;
  M lane;
  for (int l = 0; l < kWidth<acc_t>; ++l) lane[l] = l;
  for_range(N * R, K, [&](int64_t i) {
    const scalar_t* dr = dp + i * K;
    const scalar_t* yr = YT ? yp + i * K : nullptr;
    scalar_t* orow = op + i * K;
    const int64_t n = i / R, r = i % R;
    if (!channels_last) {  // row r is channel r, k is the position
      const acc_t m = cm[n * C + r], c = ca[n * C + r];
      const acc_t *pmr = pm + n * P, *par = pa + n * P;
      const int32_t* pargr = POS_MAX ? parg + n * P : nullptr;
      const acc_t* pmaxr = POS_MAX ? pmax + n * P : nullptr;
      const int64_t at = CHAN_MAX ? carg[n * C + r] : -1;
      const acc_t extra = CHAN_MAX ? cmax[n * C + r] : acc_t(0);
      const acc_t lb = YT ? ym[r] : acc_t(0), lc = YT ? yc[r] : acc_t(0);
      write_grad_row<scalar_t, acc_t>(
          orow, K, stream,
          [&](int64_t k) {
            V u = vload<acc_t>(dr + k) * vload<acc_t>(pmr + k) + vload<acc_t>(par + k);
            if constexpr (POS_MAX) u += vload_index<acc_t>(pargr + k) == static_cast<I>(r) ? vload<acc_t>(pmaxr + k) : V{};
            V v = u * m + c;
            if constexpr (CHAN_MAX) v += lane + static_cast<I>(k) == static_cast<I>(at) ? V{} + extra : V{};
            if constexpr (YT) v += (vload<acc_t>(yr + k) - lc) * lb;
            return v;
          },
          [&](int64_t k) {
            acc_t u = static_cast<acc_t>(dr[k]) * pmr[k] + par[k];
            if constexpr (POS_MAX) u += pargr[k] == r ? pmaxr[k] : acc_t(0);
            acc_t v = u * m + c + (k == at ? extra : acc_t(0));
            if constexpr (YT) v += (static_cast<acc_t>(yr[k]) - lc) * lb;
            return v;
          },
          lists, n, r, m);
    } else {  // row r is position r, k is the channel
      const acc_t m = pm[n * P + r], c = pa[n * P + r];
      const acc_t *cmr = cm + n * C, *car = ca + n * C;
      const int64_t at = POS_MAX ? parg[n * P + r] : -1;
      const acc_t extra = POS_MAX ? pmax[n * P + r] : acc_t(0);
      const int32_t* cargr = CHAN_MAX ? carg + n * C : nullptr;
      const acc_t* cmaxr = CHAN_MAX ? cmax + n * C : nullptr;
      write_grad_row<scalar_t, acc_t>(
          orow, K, stream,
          [&](int64_t k) {
            V u = vload<acc_t>(dr + k) * m + c;
            if constexpr (POS_MAX) u += lane + static_cast<I>(k) == static_cast<I>(at) ? V{} + extra : V{};
            V v = u * vload<acc_t>(cmr + k) + vload<acc_t>(car + k);
            if constexpr (CHAN_MAX) v += vload_index<acc_t>(cargr + k) == static_cast<I>(r) ? vload<acc_t>(cmaxr + k) : V{};
            if constexpr (YT) v += (vload<acc_t>(yr + k) - vload<acc_t>(yc + k)) * vload<acc_t>(ym + k);
            return v;
          },
          [&](int64_t k) {
            const acc_t u = static_cast<acc_t>(dr[k]) * m + c + (k == at ? extra : acc_t(0));
            acc_t v = u * cmr[k] + car[k];
            if constexpr (CHAN_MAX) v += cargr[k] == r ? cmaxr[k] : acc_t(0);
            if constexpr (YT) v += (static_cast<acc_t>(yr[k]) - yc[k]) * ym[k];
            return v;
          },
          lists, n, r, acc_t(1));
    }
  });
}

Tensor input_grad(const Tensor& dout, const Tensor& pos_mul, const Tensor& pos_add, const std::optional<Tensor>& pos_arg,
                  const std::optional<Tensor>& pos_max, const Tensor& chan_mul, const Tensor& chan_add,
                  const std::optional<Tensor>& chan_arg, const std::optional<Tensor>& chan_max,
                  const std::optional<Tensor>& y, const std::optional<Tensor>& y_mul, const std::optional<Tensor>& center) {
  const MapShape s = map_shape(dout, "dout");
  const Tensor& d = s.t;
  const bool channels_last = s.cl;
  const int64_t N = s.n, R = s.rows(), K = s.cols(), P = s.p(), C = s.c;
  check_acc(pos_mul, d, {N, P}, "pos_mul");
  check_acc(pos_add, d, {N, P}, "pos_add");
  check_acc(chan_mul, d, {N, C}, "chan_mul");
  check_acc(chan_add, d, {N, C}, "chan_add");
  const bool pos_terms = given(pos_arg), chan_terms = given(chan_arg);
  TORCH_CHECK(pos_terms == given(pos_max) && chan_terms == given(chan_max),
              "cbam_cpu: each arg-max index needs its gradient and the other way round");
  auto check_index = [&](const Tensor& t, int64_t len, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.sizes() == at::IntArrayRef({N, len}),
                "cbam_cpu: ", what, " must be a contiguous int32 (", N, ", ", len, ") tensor");
  };
  if (pos_terms) check_index(*pos_arg, P, "pos_arg"), check_acc(*pos_max, d, {N, P}, "pos_max");
  if (chan_terms) check_index(*chan_arg, C, "chan_arg"), check_acc(*chan_max, d, {N, C}, "chan_max");
  const bool y_terms = given(y);
  TORCH_CHECK(y_terms == given(y_mul) && y_terms == given(center), "cbam_cpu: y, y_mul and center come together");
  Tensor yt;
  if (y_terms) {
    yt = s.like(*y, "y");
    check_acc(*y_mul, d, {C}, "y_mul");
    check_acc(*center, d, {C}, "center");
  }
  Tensor dx = at::empty_like(d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "input_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    scalar_t* op = dx.mutable_data_ptr<scalar_t>();
    const acc_t *pm = pos_mul.const_data_ptr<acc_t>(), *pa = pos_add.const_data_ptr<acc_t>();
    const acc_t *cm = chan_mul.const_data_ptr<acc_t>(), *ca = chan_add.const_data_ptr<acc_t>();
    const int32_t* parg = pos_terms ? pos_arg->const_data_ptr<int32_t>() : nullptr;
    const acc_t* pmax = pos_terms ? pos_max->const_data_ptr<acc_t>() : nullptr;
    const int32_t* carg = chan_terms ? chan_arg->const_data_ptr<int32_t>() : nullptr;
    const acc_t* cmax = chan_terms ? chan_max->const_data_ptr<acc_t>() : nullptr;
    const bool stream = stream_output(dx);
    const scalar_t* yp = y_terms ? yt.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* ym = y_terms ? y_mul->const_data_ptr<acc_t>() : nullptr;
    const acc_t* yc = y_terms ? center->const_data_ptr<acc_t>() : nullptr;
    // the max term whose arg-max runs along the rows goes through row lists; the other stays in the dense pass
    const bool listed = channels_last ? chan_terms : pos_terms;
    RowLists<acc_t> lists;
    Tensor offsets, cols;
    if (listed) {
      std::tie(offsets, cols) = row_lists(channels_last ? *chan_arg : *pos_arg, R);
      lists = {offsets.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>(), channels_last ? cmax : pmax, R,
               channels_last ? C : P};
    }
    const bool dense_pos = pos_terms && channels_last, dense_chan = chan_terms && !channels_last;
    with_flags(dense_pos, dense_chan, [&](auto pos_max_terms, auto chan_max_terms) {
      constexpr bool PM = decltype(pos_max_terms)::value, CM = decltype(chan_max_terms)::value;
      if (y_terms)
        input_grad_rows<scalar_t, acc_t, PM, CM, true>(dp, op, N, R, K, channels_last, pm, pa, parg, pmax, cm, ca,
                                                       carg, cmax, yp, ym, yc, lists, stream);
      else
        input_grad_rows<scalar_t, acc_t, PM, CM, false>(dp, op, N, R, K, channels_last, pm, pa, parg, pmax, cm, ca,
                                                        carg, cmax, nullptr, nullptr, nullptr, lists, stream);
    });
  });
  return dx;
}

// Sets the tuning values (values <= 0 keep the current one) and returns the previous (col_block, task_elems,
// bunch_bytes, stream_bytes).
std::vector<int64_t> configure(int64_t col_block, int64_t task_elems, int64_t bunch_bytes, int64_t stream_bytes) {
  std::vector<int64_t> previous{kColBlock, kTaskElems, kBunchBytes, kStreamBytes};
  if (col_block > 0) kColBlock = col_block;
  if (task_elems > 0) kTaskElems = task_elems;
  if (bunch_bytes > 0) kBunchBytes = bunch_bytes;
  if (stream_bytes > 0) kStreamBytes = stream_bytes;
  return previous;
}

}  // namespace

TORCH_LIBRARY(cbam_cpu, m) {
  m.def("configure(int col_block, int task_elems, int bunch_bytes, int stream_bytes) -> int[]", &configure);
  const std::vector<at::Tag> any_layout{at::Tag::flexible_layout};
  m.def(
      "pools_and_channel_gate(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool avg, bool max, "
      "bool spatial, Tensor? in_scale=None, Tensor? in_shift=None, bool need_idx=True) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      any_layout);
  m.def(
      "forward_inference(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool avg, bool max, "
      "Tensor? conv_weight, Tensor? conv_bias, Tensor norm_scale, Tensor norm_shift, Tensor? residual, "
      "Tensor? in_scale=None, Tensor? in_shift=None, Tensor? res_scale=None, Tensor? res_shift=None) -> Tensor",
      any_layout);
  m.def(
      "forward_inference_(Tensor(a!) x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool avg, bool max, "
      "Tensor? conv_weight, Tensor? conv_bias, Tensor norm_scale, Tensor norm_shift, Tensor? residual, "
      "Tensor? in_scale=None, Tensor? in_shift=None, Tensor? res_scale=None, Tensor? res_shift=None) -> ()",
      any_layout);
  m.def("gate(Tensor x, Tensor chan, Tensor pos, Tensor? residual, Tensor? in_scale=None, Tensor? in_shift=None) -> Tensor",
        any_layout);
  m.def("spatial_conv(Tensor maps, Tensor weight, Tensor? bias) -> Tensor");
  m.def("spatial_conv_backward(Tensor d, Tensor maps, Tensor weight) -> (Tensor, Tensor)");
  m.def("cross_sums(Tensor dout, Tensor x, Tensor chan, Tensor pos) -> (Tensor, Tensor)", any_layout);
  m.def("channel_stats(Tensor y) -> (Tensor, Tensor)", any_layout);
  m.def(
      "affine_cross_sums(Tensor dout, Tensor y, Tensor pos, Tensor chan_a, Tensor chan_b, Tensor center) -> "
      "(Tensor, Tensor)",
      any_layout);
  m.def("channel_weighted_sum(Tensor x, Tensor pos_weight, Tensor pos_arg, Tensor pos_max, Tensor? center=None) -> Tensor",
        any_layout);
  m.def(
      "input_grad(Tensor dout, Tensor pos_mul, Tensor pos_add, Tensor? pos_arg, Tensor? pos_max, Tensor chan_mul, "
      "Tensor chan_add, Tensor? chan_arg, Tensor? chan_max, Tensor? y=None, Tensor? y_mul=None, Tensor? center=None) "
      "-> Tensor",
      any_layout);
}

TORCH_LIBRARY_IMPL(cbam_cpu, CPU, m) {
  m.impl("pools_and_channel_gate", &pools_and_channel_gate);
  m.impl("forward_inference", &forward_inference);
  m.impl("forward_inference_", &forward_inference_);
  m.impl("gate", &gate);
  m.impl("spatial_conv", &spatial_conv);
  m.impl("spatial_conv_backward", &spatial_conv_backward);
  m.impl("cross_sums", &cross_sums);
  m.impl("channel_stats", &channel_stats);
  m.impl("affine_cross_sums", &affine_cross_sums);
  m.impl("channel_weighted_sum", &channel_weighted_sum);
  m.impl("input_grad", &input_grad);
}
