"""Shared fixtures. JAX runs on CPU in tests, whatever the machine has."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
