// Masked-token row kernels: gather_visible and unshuffle_with_mask_token, forward and backward.
//
// One warp per output row; each lane moves 16-byte packs (8 bf16/fp16 or 4 fp32) when the row width
// in bytes is a multiple of 16 and every pointer is 16-byte aligned, else single elements. Sums are
// formed in float32. Backwards are gathers with the inverse permutation (built in Python) plus a
// per-chunk partial sum for the mask token, reduced afterwards in a fixed order: no atomics.
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "masking.h"

namespace mae_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block, one row each
constexpr int kChunk = 64;        // rows per partial sum of the mask-token gradient

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

template <typename T, typename I, int VEC>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
gather_or_fill_rows_kernel(const T* __restrict__ src, const I* __restrict__ idx, const T* __restrict__ fill,
                           const T* __restrict__ pos, const bool* __restrict__ bad, T* __restrict__ out,
                           int64_t total_rows, int64_t n_idx, int64_t src_rows, int64_t limit, int64_t upper,
                           int64_t D, int head, bool pos_by_src) {
  const int64_t n_vec = D / VEC;
  const int64_t per_batch = head + n_idx;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; row < total_rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t b = row / per_batch;
    const int64_t r = row - b * per_batch;
    const bool body = r >= head;
    const int64_t j = body ? static_cast<int64_t>(idx[b * n_idx + (r - head)]) : 0;
    const bool in_src = j >= 0 && j < limit;
    const bool take_src = !body || in_src;
    const bool take_fill = body && j >= limit && j < upper;
    const bool poison = (body && !(in_src || take_fill)) || (bad != nullptr && bad[b]);
    const T* src_row = src + (b * src_rows + (body ? head + j : r)) * D;
    const bool add_pos = pos != nullptr && (pos_by_src ? in_src : true);
    const T* pos_row = add_pos ? pos + (pos_by_src ? j : r) * D : nullptr;
    const T* from = take_src ? src_row : (take_fill ? fill : nullptr);  // nullptr: zeros
    T* out_row = out + row * D;
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < n_vec; v += kWarp) {
      float acc[VEC];
      if (from != nullptr && !poison) {
        const Pack<T, VEC> a = load_pack<T, VEC>(from + v * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = static_cast<float>(a.v[k]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
      }
      if (pos_row != nullptr) {
        const Pack<T, VEC> p = load_pack<T, VEC>(pos_row + v * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += static_cast<float>(p.v[k]);
      }
      Pack<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<T>(poison ? quiet_nan() : acc[k]);
      *reinterpret_cast<Pack<T, VEC>*>(out_row + v * VEC) = o;
    }
  }
}

template <typename T, typename I, int VEC>
__global__ void masked_row_partial_sums_kernel(const T* __restrict__ grad, const I* __restrict__ idx,
                                               float* __restrict__ partial, int64_t L, int64_t K, int64_t D,
                                               int head, int64_t n_chunks) {
  const int64_t chunk = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t n_vec = D / VEC;
  const int64_t first = chunk * kChunk;
  const int64_t last = first + kChunk < L ? first + kChunk : L;
  for (int64_t v = threadIdx.x; v < n_vec; v += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
#pragma unroll 4
    for (int64_t i = first; i < last; ++i) {
      const int64_t j = static_cast<int64_t>(idx[b * L + i]);
      if (j >= K && j < L) {
        const Pack<T, VEC> g = load_pack<T, VEC>(grad + (b * (head + L) + head + i) * D + v * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += static_cast<float>(g.v[k]);
      }
    }
    float* dst = partial + (b * n_chunks + chunk) * D + v * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) dst[k] = acc[k];
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

void check_cuda_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "mae_fast masking: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "mae_fast masking: ", name, " must be contiguous");
}

}  // namespace

at::Tensor gather_or_fill_rows(const at::Tensor& src, const at::Tensor& idx, const std::optional<at::Tensor>& fill,
                               const std::optional<at::Tensor>& pos, bool pos_by_src,
                               const std::optional<at::Tensor>& bad, int64_t head, int64_t limit, int64_t upper) {
  check_cuda_contiguous(src, "src");
  check_cuda_contiguous(idx, "idx");
  TORCH_CHECK(src.dim() == 3 && idx.dim() == 2 && idx.size(0) == src.size(0), "gather_or_fill_rows: bad shapes");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, "idx must be int32 or int64");
  TORCH_CHECK(head == 0 || head == 1, "head must be 0 or 1");
  const int64_t B = src.size(0), src_rows = src.size(1), D = src.size(2), N = idx.size(1);
  TORCH_CHECK(src_rows >= head, "src has fewer rows than head");
  for (const auto* t : {&fill, &pos}) {
    if (t->has_value()) {
      check_cuda_contiguous(**t, "fill/pos");
      TORCH_CHECK((*t)->scalar_type() == src.scalar_type(), "fill/pos must have the dtype of src");
      TORCH_CHECK((*t)->size(-1) == D, "fill/pos width must equal D");
    }
  }
  if (bad.has_value()) {
    check_cuda_contiguous(*bad, "bad");
    TORCH_CHECK(bad->scalar_type() == at::kBool && bad->numel() == B, "bad must be (B,) bool");
  }
  const c10::cuda::CUDAGuard guard(src.device());
  at::Tensor out = at::empty({B, head + N, D}, src.options());
  const int64_t total = B * (head + N);
  if (total == 0 || D == 0) return out;
  const int64_t blocks_needed = (total + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count(src.get_device())) * 64;
  const dim3 grid(static_cast<unsigned>(blocks_needed < max_blocks ? blocks_needed : max_blocks));
  const dim3 block(kWarp, kRowsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_or_fill_rows", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    const T* fill_p = fill.has_value() ? fill->data_ptr<T>() : nullptr;
    const T* pos_p = pos.has_value() ? pos->data_ptr<T>() : nullptr;
    const bool* bad_p = bad.has_value() ? bad->data_ptr<bool>() : nullptr;
    const bool vec_ok = D % kVec == 0 && aligned16(src.data_ptr()) && aligned16(out.data_ptr()) &&
                        (fill_p == nullptr || aligned16(fill_p)) && (pos_p == nullptr || aligned16(pos_p));
    auto launch = [&](auto index_tag) {
      using I = decltype(index_tag);
      const I* idx_p = idx.data_ptr<I>();
      if (vec_ok) {
        gather_or_fill_rows_kernel<T, I, kVec><<<grid, block, 0, stream>>>(
            src.data_ptr<T>(), idx_p, fill_p, pos_p, bad_p, out.data_ptr<T>(), total, N, src_rows, limit, upper, D,
            static_cast<int>(head), pos_by_src);
      } else {
        gather_or_fill_rows_kernel<T, I, 1><<<grid, block, 0, stream>>>(
            src.data_ptr<T>(), idx_p, fill_p, pos_p, bad_p, out.data_ptr<T>(), total, N, src_rows, limit, upper, D,
            static_cast<int>(head), pos_by_src);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (idx.scalar_type() == at::kLong) launch(int64_t{}); else launch(int32_t{});
  });
  return out;
}

at::Tensor masked_row_partial_sums(const at::Tensor& grad, const at::Tensor& idx, int64_t head, int64_t K) {
  check_cuda_contiguous(grad, "grad");
  check_cuda_contiguous(idx, "idx");
  TORCH_CHECK(grad.dim() == 3 && idx.dim() == 2 && idx.size(0) == grad.size(0), "masked_row_partial_sums: bad shapes");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, "idx must be int32 or int64");
  const int64_t B = idx.size(0), L = idx.size(1), D = grad.size(2);
  TORCH_CHECK(grad.size(1) == head + L, "grad must have head + L rows");
  const int64_t n_chunks = L > 0 ? (L + kChunk - 1) / kChunk : 1;
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor partial = at::zeros({B * n_chunks, D}, grad.options().dtype(at::kFloat));
  if (B == 0 || L == 0 || D == 0) return partial;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_row_partial_sums", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    const bool vec_ok = D % kVec == 0 && aligned16(grad.data_ptr());
    const int64_t n_vec = vec_ok ? D / kVec : D;
    const int threads = static_cast<int>(n_vec >= 256 ? 256 : ((n_vec + kWarp - 1) / kWarp) * kWarp);
    const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(B));
    auto launch = [&](auto index_tag) {
      using I = decltype(index_tag);
      if (vec_ok) {
        masked_row_partial_sums_kernel<T, I, kVec><<<grid, threads, 0, stream>>>(
            grad.data_ptr<T>(), idx.data_ptr<I>(), partial.data_ptr<float>(), L, K, D, static_cast<int>(head), n_chunks);
      } else {
        masked_row_partial_sums_kernel<T, I, 1><<<grid, threads, 0, stream>>>(
            grad.data_ptr<T>(), idx.data_ptr<I>(), partial.data_ptr<float>(), L, K, D, static_cast<int>(head), n_chunks);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (idx.scalar_type() == at::kLong) launch(int64_t{}); else launch(int32_t{});
  });
  return partial;
}

}  // namespace mae_fast
