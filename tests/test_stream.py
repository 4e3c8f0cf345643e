"""Image folders decoded on demand through grain (issue 18 item 3): the same labels, split,
k-shot draws, batches and results as the in-memory path, lazily subset, errors named."""
import json

import numpy as np
import pytest
from PIL import Image

from jtransfer.data import Batches, fewshot as fewshot_data, folder, sample_kshot, stream
from jtransfer.errors import InputError


def _tree(root, per_class=(5, 6, 4), size=20):
  rng = np.random.default_rng(0)
  for c, n in enumerate(per_class):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(n):
      pixels = rng.integers(0, 256, (size, size + 4, 3)).astype(np.uint8)
      Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.{'png' if i % 2 else 'jpg'}")
  return root


def test_lazy_folder_equals_the_in_memory_one(tmp_path):
  root = _tree(tmp_path / "images")
  memory = folder.load_folder(root, image_size=16, channels=3)
  lazy = folder.load_folder(root, image_size=16, channels=3,
                            stream=stream.StreamOptions(threads=2, prefetch=3))
  assert stream.is_lazy(lazy.train.images) and stream.is_lazy(lazy.test.images)
  for m, z in ((memory.train, lazy.train), (memory.test, lazy.test)):
    np.testing.assert_array_equal(m.labels, z.labels)
    assert z.images.shape == m.images.shape and z.class_names == m.class_names
    np.testing.assert_array_equal(z.images[:], m.images)          # a slice decodes
    np.testing.assert_array_equal(z.images[2], m.images[2])       # one row
    np.testing.assert_array_equal(np.asarray(z.images), m.images)  # np.asarray decodes all
  # k-shot draws read labels only: identical; the batches over the drawn rows too
  train_idx, val_idx = sample_kshot(memory.train.labels, 2, 7, val_per_class=1)
  lazy_idx = sample_kshot(lazy.train.labels, 2, 7, val_per_class=1)
  np.testing.assert_array_equal(train_idx, lazy_idx[0])
  np.testing.assert_array_equal(val_idx, lazy_idx[1])
  a = Batches(memory.train.images, memory.train.labels, 4, seed=3)
  b = Batches(lazy.train.images, lazy.train.labels, 4, seed=3)
  for step in range(7):
    np.testing.assert_array_equal(a.at(step)["image"], b.at(step)["image"])
    np.testing.assert_array_equal(a.at(step)["label"], b.at(step)["label"])
  # subsets stay lazy (nothing decoded until read)
  sub = fewshot_data.subset_classes(lazy, ("class2", "class0"))
  assert stream.is_lazy(sub.train.images) and sub.train.class_names == ("class2", "class0")
  want = fewshot_data.subset_classes(memory, ("class2", "class0"))
  np.testing.assert_array_equal(sub.train.images[:], want.train.images)
  assert stream.is_lazy(lazy.train.take(np.array([3, 1])).images)


def test_worker_processes_decode_the_same_pixels(tmp_path):
  root = _tree(tmp_path / "images", per_class=(3, 3))
  memory = folder.load_folder(root, image_size=12, channels=1)
  lazy = folder.load_folder(root, image_size=12, channels=1,
                            stream=stream.StreamOptions(threads=1, workers=1))
  np.testing.assert_array_equal(lazy.train.images[::-1], memory.train.images[::-1])


def test_unreadable_file_is_named_when_decoded(tmp_path):
  root = _tree(tmp_path / "images", per_class=(3, 3))
  (root / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
  lazy = folder.load_folder(root, image_size=12, channels=3, stream=stream.StreamOptions())
  with pytest.raises(InputError, match="broken.jpg"):
    lazy.train.images[:], lazy.test.images[:]
  with pytest.raises(InputError, match="threads"):
    stream.StreamOptions(threads=0)


def test_centre_view_stays_lazy_and_equals_the_in_memory_view(tmp_path):
  from jtransfer.data import augment
  root = _tree(tmp_path / "images", per_class=(6, 6, 6), size=20)
  opts = stream.StreamOptions(threads=2, prefetch=2)
  lazy = folder.load_folder(root, image_size=20, channels=3, stream=opts).train.images
  memory = np.asarray(lazy)
  view = lazy.centre_view((16, 16))
  assert stream.is_lazy(view) and view.shape == (len(lazy), 16, 16, 3)
  want = augment.center_view(memory, (16, 16))
  np.testing.assert_array_equal(np.asarray(view), want)
  sub = stream.take(view, np.array([4, 0]))
  assert stream.is_lazy(sub) and sub.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(sub[:], want[[4, 0]])
  np.testing.assert_array_equal(view[3], want[3])
  assert view[np.zeros(len(view), bool)].shape == (0, 16, 16, 3)
  assert lazy.centre_view((20, 20)).view is None  # stored = input: no view
  with pytest.raises(InputError, match="already a view"):
    view.centre_view((8, 8))


@pytest.mark.slow  # 21 s; the stream itself is tested on arrays above
def test_fewshot_streamed_target_gives_the_in_memory_results(tiny_source_dir, tmp_path):
  from experiments import fewshot
  root = _tree(tmp_path / "images", per_class=(6, 6, 6), size=28)
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          f"folder:{root}", "--strategies", "freeze,finetune", "--steps", "3", "--repeats", "1",
          "--shots", "2", "--test-per-class", "2", "--val-per-class", "1", "--lrs", "0.001",
          "--tune-repeats", "0", "--no-paper-grid", "--quiet"]
  assert fewshot.main(argv + ["--out", str(tmp_path / "memory")]) == 0
  assert fewshot.main(argv + ["--out", str(tmp_path / "lazy"), "--stream-threads", "2"]) == 0
  read = lambda d: json.loads((tmp_path / d / "results.json").read_text())
  assert read("memory") == read("lazy")
  # Stored at 36 px for the 28 px input: augmented crops of the stored pixels, centre views
  # for validation and test, decoded batch by batch; the same numbers as in memory.
  stored = ["--stored-size", "36", "--augment", "rrc+flip"]
  assert fewshot.main(argv + stored + ["--out", str(tmp_path / "memory36")]) == 0
  assert fewshot.main(argv + stored + ["--out", str(tmp_path / "lazy36"),
                                       "--stream-threads", "2"]) == 0
  assert read("memory36") == read("lazy36") and read("lazy36")[0]["extra"]["stored_size"] == 36
  assert fewshot.main(["--target", "digits", "--stream-threads", "2"] + argv[2:4] +
                      ["--out", str(tmp_path / "y"), "--quiet"]) == 2
