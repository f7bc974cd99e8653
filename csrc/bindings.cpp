// The pybind11 module sslkernels._C: one register_<family> per csrc/bindings_<family>.cpp
// (conventions of every binding: bindings_common.hpp). A new family is one declaration
// and one call below, plus its file in CMakeLists.txt.
#include <pybind11/pybind11.h>

extern "C" void scipy_openblas_set_num_threads(int num_threads);

void register_contrastive(pybind11::module_& m);  // bindings_contrastive.cpp
void register_spectral(pybind11::module_& m);     // bindings_spectral.cpp
void register_attention(pybind11::module_& m);    // bindings_attention.cpp
void register_sigreg(pybind11::module_& m);       // bindings_sigreg.cpp
void register_siglip(pybind11::module_& m);       // bindings_siglip.cpp
void register_koleo(pybind11::module_& m);        // bindings_koleo.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslkernels CPU core (C++, OpenBLAS tile products, OpenMP over tiles)";
  // Our kernels parallelise over tiles; BLAS stays single-threaded inside them.
  scipy_openblas_set_num_threads(1);
  register_contrastive(m);
  register_spectral(m);
  register_attention(m);
  register_sigreg(m);
  register_siglip(m);
  register_koleo(m);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
