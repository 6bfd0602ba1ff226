// The one operator library of the extension.  Schemas live here; the CPU kernels register in
// cpu/*.cpp and the CUDA kernels in cuda/*.cu.  The Python front end
// (bayeskern.ops) wraps these in torch.library custom ops with autograd and fake tensors.
#include "cpu/block_pool.h"

#include <torch/library.h>

TORCH_LIBRARY(bayeskern_cpp, m) {
  m.def("gaussian_sample(Tensor mu, Tensor rho, int seed, int offset, int stream) -> Tensor");
  m.def("gaussian_sample_backward(Tensor grad, Tensor rho, int seed, int offset, int stream) -> Tensor");
  m.def("weight_dropout(Tensor w, float p, int seed, int offset, int stream, Tensor? fill) -> Tensor");
  m.def("weight_dropout_backward(Tensor grad, float p, int seed, int offset, int stream, float scale) -> Tensor");
  m.def("fill_normal_(Tensor(a!) out, int seed, int offset, int stream) -> Tensor(a!)");
  m.def("fill_uniform_(Tensor(a!) out, int seed, int offset, int stream) -> Tensor(a!)");
  m.def(
      "sgld_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] prior_means, Tensor(b!)[] square_avgs, float lr, float prior_precision, float noise_scale, float alpha, float eps, int seed, int step, int[] offsets) -> ()");
  m.def(
      "ivon_draw_(Tensor(a!)[] params, Tensor(b!)[] means, Tensor[] hesses, float ess, float delta, int seed, int stream, int[] offsets) -> ()");
  m.def(
      "ivon_collect_(Tensor[] grads, Tensor(a!)[] grad_sums, Tensor(b!)[] grad_eps_sums, bool accumulate, int seed, int stream, int[] offsets) -> ()");
  m.def(
      "ivon_update_(Tensor(a!)[] params, Tensor(b!)[] momenta, Tensor(c!)[] hesses, Tensor[] grad_sums, Tensor[] grad_eps_sums, Tensor[] prior_means, float lr, float ess, float delta, float beta1, float beta2, float bias_correction, float clip_radius, float scale) -> ()");
  m.def("gaussian_kl(Tensor mu, Tensor rho, Tensor? prior_mean, float prior_std) -> Tensor");
  m.def(
      "gaussian_kl_backward(Tensor grad, Tensor mu, Tensor rho, Tensor? prior_mean, float prior_std) -> (Tensor, Tensor)");
  m.def("first_nonfinite(Tensor[] tensors) -> int");
  m.def(
      "gaussian_sample_kl(Tensor[] mus, Tensor[] rhos, Tensor?[] prior_means, float[] prior_stds, int seed, int[] offsets, int stream) -> (Tensor[], Tensor)");
  m.def(
      "gaussian_sample_kl_backward(Tensor[] grads, Tensor grad_kl, Tensor[] mus, Tensor[] rhos, Tensor[] samples, Tensor?[] prior_means, float[] prior_stds, int seed, int[] offsets, int stream) -> (Tensor[], Tensor[])");
  m.def(
      "weight_dropout_l2(Tensor[] mus, float p, bool fill_prior, Tensor?[] prior_means, float[] prior_stds, int seed, int[] offsets, int stream) -> (Tensor[], Tensor)");
  m.def(
      "weight_dropout_l2_backward(Tensor[] grads, Tensor grad_l2, Tensor[] mus, float p, bool fill_prior, Tensor?[] prior_means, float[] prior_stds, int seed, int[] offsets, int stream) -> Tensor[]");
  m.def("release_cached_blocks() -> int", &bayeskern::cpu::release_cached_blocks);  // no tensors: one kernel
}
