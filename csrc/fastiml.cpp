// Op schemas of the fastiml library and the Python module that carries them.
// Each backend file registers its own dispatch key (ops/cpu/*_kernel.cpp, ops/cuda/*_kernel.cu).
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "ops/cpu/capability.h"

// Bumped whenever a schema changes: fastiml/ops.py refuses a compiled module of another version.
#define FASTIML_ABI_VERSION 7

TORCH_LIBRARY(fastiml, m) {
  // DESIGN 2.1. k, k_label and k_group are None for self-contrast (k is q): the kernels then
  // return one gradient (the CPU kernel uses the symmetry of the similarity matrix).
  m.def("pair_stats(Tensor q, Tensor? k, Tensor q_label, Tensor? k_label, Tensor? q_group, "
        "Tensor? k_group, float tau, bool exclude_self, bool negatives_only, int ignore_index) "
        "-> (Tensor lse, Tensor pos_mean, Tensor pos_count)");
  m.def("pair_stats_backward(Tensor grad_lse, Tensor grad_pos_mean, Tensor q, Tensor? k, "
        "Tensor q_label, Tensor? k_label, Tensor? q_group, Tensor? k_group, Tensor lse, "
        "Tensor pos_count, float tau, bool exclude_self, bool negatives_only, int ignore_index, "
        "bool q_needs_grad, bool k_needs_grad) -> (Tensor grad_q, Tensor grad_k)");
  // The tile schedule both pair_stats backends follow (ops/pair_stats_host.h), for tests and
  // inspection: group codes (negative: ignored) of the own and other entries, in, the flattened
  // schedule out (item w's other tiles are others[begin[w]:begin[w+1]]; owner: each pair's own
  // tile; splits = (len(begin) - 1) / own tiles).
  m.def("pair_stats_tile_schedule(Tensor own_group, Tensor other_group, int tile, "
        "bool upper_only, int min_items) -> (Tensor begin, Tensor others, Tensor owner)");
  // The range exponents of the CUDA dk pass's 16-bit G tiles (TileRangeScale in
  // ops/pair_stats.h), for tests: one per row tile, from each tile's largest |G| entry (an
  // int64 CPU tensor; both backends register it).
  m.def("pair_stats_range_exponents(Tensor tile_max, float x_max, int rows) -> Tensor");
  // DESIGN 2.2.
  m.def("contour_mine(Tensor mask, int patch, float lo, float hi, Tensor? valid) "
        "-> (Tensor frac, Tensor klass)");
  m.def("contour_band(Tensor mask, int radius, Tensor? valid) -> Tensor");
  // DESIGN 2.3.
  m.def("pivot_consistency(Tensor logit_a, Tensor logit_b, Tensor klass, int patch, "
        "float weight_contour, float weight_other) -> Tensor");
  m.def("pivot_consistency_backward(Tensor grad, Tensor logit_a, Tensor logit_b, Tensor klass, "
        "int patch, float weight_contour, float weight_other) -> (Tensor grad_a, Tensor grad_b)");
  // DESIGN 9 (NT-Xent): per row, total = sum over positives j of softplus(lse_i - s_ij) and
  // weight = the sum of sigmoid(lse_i - s_ij) (d total / d lse); arguments as pair_stats'.
  m.def("pair_softplus(Tensor q, Tensor? k, Tensor q_label, Tensor? k_label, Tensor? q_group, "
        "Tensor? k_group, Tensor lse, float tau, bool exclude_self, int ignore_index) "
        "-> (Tensor total, Tensor weight)");
  m.def("pair_softplus_backward(Tensor grad_total, Tensor q, Tensor? k, Tensor q_label, "
        "Tensor? k_label, Tensor? q_group, Tensor? k_group, Tensor lse, float tau, "
        "bool exclude_self, int ignore_index, bool q_needs_grad, bool k_needs_grad) "
        "-> (Tensor grad_q, Tensor grad_k)");
  // DESIGN 11 (CLIP): with S = scale * q k^T ([N, M]; scale a learned 0-dim tensor in the
  // accumulation dtype), the log-sum-exp of every row and of every column and the diagonal
  // S_ii (i < min(N, M)), from one tiled pass; the backward recomputes each tile once for both
  // features' and the scale's gradients.
  m.def("clip_lse(Tensor q, Tensor k, Tensor scale) "
        "-> (Tensor row_lse, Tensor col_lse, Tensor diag)");
  m.def("clip_lse_backward(Tensor grad_row, Tensor grad_col, Tensor grad_diag, Tensor q, "
        "Tensor k, Tensor scale, Tensor row_lse, Tensor col_lse, bool q_needs_grad, "
        "bool k_needs_grad, bool scale_needs_grad) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
  // DESIGN 11 (SigLIP): loss = sum over all pairs of softplus(-z_ij (scale <q_i, k_j> + bias)),
  // z = +1 on the pairs (i, i + offset), -1 elsewhere (scale, bias: 0-dim, accumulation dtype).
  m.def("siglip_loss(Tensor q, Tensor k, Tensor scale, Tensor bias, int offset) -> Tensor");
  m.def("siglip_loss_backward(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor bias, "
        "int offset, bool q_needs_grad, bool k_needs_grad, bool scalars_need_grad) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_scale, Tensor grad_bias)");
  // DESIGN 11 (MoCo's memory bank): lse[i] = logsumexp_j S_ij of S = scale * q k^T and, with
  // with_mean, mean[i] = sum_j softmax_j(S_i)_j k_j ([N, D]; else an empty tensor): the
  // gradient of lse in q and in the scale is elementwise in it (fastiml/ops.py), so a bank that
  // takes no gradient is read once per step. No backward op.
  m.def("row_lse(Tensor q, Tensor k, Tensor scale, bool with_mean) -> (Tensor lse, Tensor mean)");
}

static PyObject* abi_version(PyObject*, PyObject*) { return PyLong_FromLong(FASTIML_ABI_VERSION); }

static PyObject* compiled_with_cuda(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// The GPU architectures the CUDA kernels were built for, as ((sass...), (ptx...)), e.g.
// ((80, 90), (90,)); ((), ()) without CUDA. fastiml.ops names a GPU none of them covers.
static PyObject* cuda_archs(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  static const int sass[] = {0, FASTIML_CUDA_SASS};  // a leading 0: the lists may be empty
  static const int ptx[] = {0, FASTIML_CUDA_PTX};
  const int n_sass = sizeof(sass) / sizeof(int) - 1, n_ptx = sizeof(ptx) / sizeof(int) - 1;
#else
  static const int sass[] = {0}, ptx[] = {0};
  const int n_sass = 0, n_ptx = 0;
#endif
  PyObject* s = PyTuple_New(n_sass);
  PyObject* p = PyTuple_New(n_ptx);
  for (int i = 0; i < n_sass; ++i) PyTuple_SET_ITEM(s, i, PyLong_FromLong(sass[i + 1]));
  for (int i = 0; i < n_ptx; ++i) PyTuple_SET_ITEM(p, i, PyLong_FromLong(ptx[i + 1]));
  return Py_BuildValue("(NN)", s, p);
}

// The CPU kernels' instruction-set level (ops/cpu/capability.h), for fastiml.ops.
static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastiml::cpu::capability_name(fastiml::cpu::capability()));
}

static PyObject* best_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastiml::cpu::capability_name(fastiml::cpu::best_capability()));
}

static PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;  // not a str: PyUnicode_AsUTF8 raised TypeError
  try {
    fastiml::cpu::set_capability(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"abi_version", abi_version, METH_NOARGS, "Schema version of this compiled module."},
    {"compiled_with_cuda", compiled_with_cuda, METH_NOARGS, "Whether CUDA kernels were built."},
    {"cuda_archs", cuda_archs, METH_NOARGS,
     "The CUDA kernels' architectures: ((sass, ...), (ptx, ...)) as 80, 90, ..."},
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU kernels' level in force."},
    {"best_cpu_capability", best_cpu_capability, METH_NOARGS,
     "The best CPU kernel level this CPU and build support."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "Sets the CPU kernels' level: 'default', 'avx2' or 'avx512' (at most the best)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

// Importing the module loads the library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
