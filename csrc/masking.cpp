// Python bindings of the masked-token CUDA kernels (built by mae_fast.csrc.masking).
#include <torch/extension.h>

#include "masking.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mae_fast masked-token CUDA kernels (gather_visible, unshuffle_with_mask_token)";
  m.def("gather_or_fill_rows", &mae_fast::gather_or_fill_rows, "gather rows by index or fill, plus pos-embed",
        py::arg("src"), py::arg("idx"), py::arg("fill"), py::arg("pos"), py::arg("pos_by_src"), py::arg("bad"),
        py::arg("head"), py::arg("limit"), py::arg("upper"));
  m.def("masked_row_partial_sums", &mae_fast::masked_row_partial_sums,
        "per-chunk float32 sums of the rows whose index marks a mask token",
        py::arg("grad"), py::arg("idx"), py::arg("head"), py::arg("K"));
}
