// The dcp operator library: schemas of the ops every compiled backend implements.
//
//   dcp::gathered_conv2d           convolution of the out_idx x in_idx block (only those channels are
//                                  read and computed); y full width with zeros, or compact
//   dcp::gathered_conv2d_backward  grad-input restricted to in_idx, grad of the weight block written
//                                  into a full-size zero grad-weight, grad-bias
//   dcp::channel_utility           v_c = sum_b |sum_hw g*a| / (B*H*W), float32
//   dcp::implicit_gemm_conv2d[_backward]  the CUDA fused kernels with tile family and split-K forced;
//                                  on CPU tensors the same kernels emulated (for the tests)
//
// Kernels: csrc/cpu/ (CPU), csrc/cuda/ (CUDA). Autograd and fake (meta) kernels are registered from
// Python (dcp_kernels/ops/registration.py) so the ops work under torch.compile.
#include <Python.h>
#include <torch/library.h>

// Importing dcp_kernels._C from Python loads this library, which runs the registrations below.
// The module's one attribute, WITH_CUDA, says whether the CUDA kernels were compiled in.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef DCP_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(dcp, m) {
  m.def(
      "gathered_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor in_idx, Tensor out_idx, "
      "int[] stride, int[] padding, int[] dilation, bool depthwise, bool x_compact, bool y_compact) -> Tensor");
  m.def(
      "gathered_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor in_idx, Tensor out_idx, "
      "int[] stride, int[] padding, int[] dilation, bool depthwise, bool x_compact, bool y_compact, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("channel_utility(Tensor a, Tensor g) -> Tensor");
  // The fused gather implicit-GEMM convolution with its configuration explicit (mma: -1 choose,
  // 0 SIMT tiles, 1 tensor-core tiles; wgrad_splits: 0 choose): on CUDA tensors the kernels that
  // gathered_conv2d runs there, on CPU tensors the same kernels under the CPU emulation of CUDA
  // (csrc/emulation/fused_conv_emulated.cpp, test-only: tests/emulated_kernels.py builds it).
  m.def(
      "implicit_gemm_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor in_idx, Tensor out_idx, "
      "int[] stride, int[] padding, int[] dilation, bool depthwise, bool x_compact, bool y_compact, "
      "int mma, int wgrad_splits) -> Tensor");
  m.def(
      "implicit_gemm_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor in_idx, Tensor out_idx, "
      "int[] stride, int[] padding, int[] dilation, bool depthwise, bool x_compact, bool y_compact, "
      "bool[3] output_mask, int mma, int wgrad_splits) -> (Tensor, Tensor, Tensor)");
}
