// Masked-token row kernels (CUDA): declarations shared by masking.cu and the pybind module masking.cpp.
#pragma once
#include <optional>

#include <ATen/ATen.h>

namespace mae_fast {

// src (B, head+S, D), idx (B, N) int32/int64 -> (B, head+N, D). Output row r < head copies src row r;
// body row i takes src row head+idx when idx in [0, limit), the fill row (zero if none) when idx in
// [limit, upper), NaN otherwise; adds pos row idx (pos_by_src) or the output row; NaN for bad batches.
at::Tensor gather_or_fill_rows(const at::Tensor& src, const at::Tensor& idx, const std::optional<at::Tensor>& fill,
                               const std::optional<at::Tensor>& pos, bool pos_by_src,
                               const std::optional<at::Tensor>& bad, int64_t head, int64_t limit, int64_t upper);

// grad (B, head+L, D), idx (B, L) -> (B * n_chunks, D) float32 partial sums of the rows with K <= idx < L.
at::Tensor masked_row_partial_sums(const at::Tensor& grad, const at::Tensor& idx, int64_t head, int64_t K);

}  // namespace mae_fast
