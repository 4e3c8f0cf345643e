"""bench.bench_ffi_filter's FFI kernel gradient (bench/ffi_filter_grad.cc) equals XLA's."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.slow  # a g++ build (~12 s idle) and one compile per case
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the FFI kernel")
def test_ffi_kernel_gradient_equals_xla(tmp_path):
  from bench import bench_ffi_filter as bff
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU FFI target")
  bff.register(bff.build(str(tmp_path)))
  g = np.random.default_rng(0)
  for k, stride, padding in [(1, 1, "VALID"), (1, 2, "SAME"), (3, 1, "SAME"), (3, 2, "SAME"),
                             (3, 2, "VALID"), (7, 2, "SAME"), (7, 1, "VALID")]:
    x = jnp.asarray(g.normal(size=(3, 11, 10, 5)), jnp.float32)
    pads = tuple(jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (stride, stride), padding))
    oh, ow = jax.eval_shape(lambda a: jax.lax.conv_general_dilated(
        a, jnp.zeros((k, k, 5, 4)), (stride, stride), pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC")), x).shape[1:3]
    dy = jnp.asarray(g.normal(size=(3, oh, ow, 4)), jnp.float32)
    want = bff._xla_filter_grad(x, dy, (k, k), (stride, stride), pads)
    for threads in (1, 2):
      got = bff.ffi_filter_grad(x, dy, (k, k), (stride, stride), pads, threads)
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()),
                                 err_msg=f"k={k} stride={stride} {padding} threads={threads}")
