"""bench.bench_ffi_filter: its conv table and its whole-step comparison run, on tiny settings."""
import shutil

import jax
import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or jax.default_backend() != "cpu",
    reason="needs g++ to build the native kernel, and the CPU backend")


def test_conv_table_compares_and_names_autos_choice(tmp_path):
  from bench import bench_ffi_filter as bff
  out = tmp_path / "ffi.md"
  assert bff.main(["--archs", "vgg_s", "--batch", "2", "--runs", "1", "--out", str(out)]) == 0
  text = out.read_text()
  assert "| vgg_s | 2x28x28x32 | 3x3x32x32 | 1 |" in text
  assert "native |" in text and "xla |" in text  # 'auto's pick: 3x3x32 native, the stem XLA's


@pytest.mark.slow  # two vgg_s finetune steps compiled
def test_step_comparison_runs(tmp_path):
  from bench import bench_ffi_filter as bff
  t = bff.step_compare("vgg_s", runs=1, batch=2)
  assert set(t) == {"xla", "native"} and all(w > 0 and c >= 0 for w, c in t.values())
