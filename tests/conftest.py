"""Shared fixtures. JAX runs on CPU in tests, whatever the machine has."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite's programs are tiny models run for a few steps: compiling them is most of its time,
# and LLVM's optimisation passes are a large part of a CPU compile, while at these sizes the
# optimised code's speed matters little. At level 0 the cold fresh-clone suite ran in 656 s
# against 1,044 s (with other changes; BUILD_NOTES.md, "CI"). Tests only: the library and the
# modules keep XLA's default; set JTRANSFER_TEST_XLA_OPT=1 to run the suite at it. Set before
# jax starts (the CPU backend reads XLA_FLAGS once); part of the compilation cache's key, so
# the two never share entries.
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if (os.environ.get("JTRANSFER_TEST_XLA_OPT", "0") != "1"
    and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAG]).strip()

import pytest  # noqa: E402

from jtransfer.compile_cache import enable_compilation_cache  # noqa: E402

# Every test file compiles the same small-model steps: keep them on disk across runs and
# xdist workers (JTRANSFER_COMPILATION_CACHE=0 to measure cold compiles).
enable_compilation_cache()


@pytest.fixture(scope="session")
def tiny_source_dir(tmp_path_factory):
  """Directory factory: a tiny pretrained source per arch (a few seconds each), saved once."""
  from jtransfer import sources
  from jtransfer.methods import transfer
  made = {}

  def get(arch: str = "vgg_s") -> str:
    if arch not in made:
      path = str(tmp_path_factory.mktemp(f"src-{arch}") / "model")
      source = sources.pretrain(arch, "fmnist:0,2,3,4,6", epochs=0.02, max_train=256,
                                 batch_size=64, progress=False)
      transfer.save_source(path, source)
      made[arch] = path
    return made[arch]

  return get
