"""One retrieval run of the CWL paper's Table III: transfer on the labelled queries, describe
by MAC, rank the database, score.

As in the paper (sec. V-B), a strategy is trained as a classifier on the labelled query images
only (`QueryTrainer`); its head is then dropped and images are described by MAC (`mac_fn`,
`describe`), the database ranked by cosine similarity (`retrieval.rank_database`) and scored by
revisitop's mAP (`score`). Two tasks supply queries and database: `embedded_task` (k labelled
queries per class from a dataset's train split, the database from its test split; positives are
the database images of the query's class) and `revisited_task` (a revisited Oxford/Paris ground
truth and its image folder; queries cropped to their bounding box and labelled by landmark,
Easy / Medium / Hard setups).
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from jtransfer import models
from jtransfer.data import Batches, sample_kshot
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import cwl, retrieval, transfer
from jtransfer.train import fit, init_state, make_train_step


class QueryTrainer:
  """Per strategy, one Setup and one compiled train step, reused for every LR and query draw.

  Args:
    source: the pretrained source.
    num_classes: classes of the queries (the head trained, then dropped).
    steps, batch_size, seed: the training run (a fixed number of Adam steps, as the paper).
  """

  def __init__(self, source: transfer.Source, num_classes: int, steps: int, batch_size: int,
               seed: int):
    self.source, self.num_classes = source, num_classes
    self.steps, self.batch_size, self.seed = steps, batch_size, seed
    self._built: dict = {}

  def __call__(self, name: str, images: np.ndarray, labels: np.ndarray, lr: float):
    """(model, effective params (CWL scales folded in), stats) after training strategy `name`
    on the labelled queries at `lr`; lr 0 trains nothing (the source as it is)."""
    if name not in self._built:
      setup = transfer.get_strategy(name).build(self.source, self.num_classes, self.steps)
      self._built[name] = (setup, make_train_step(setup.loss_fn, setup.optimizer))
    setup, step = self._built[name]
    params, stats = setup.init(self.seed, images, labels)
    if lr > 0:
      state = init_state(params, stats, setup.optimizer, self.seed, lr)
      state = fit(state, step, Batches(images, labels, self.batch_size, self.seed).at,
                  self.steps)
      params, stats = state.params, state.batch_stats
    return setup.model, cwl.effective_params(params), stats


def mac_fn(model, mean, std, tap: str = "conv") -> Callable:
  """Jitted (params, stats, uint8 images) -> l2-normalised MAC (the head is unused).

  Args:
    model: the target model.
    mean, std: the source's input normalisation.
    tap: 'conv' (default), the last conv layer's output, or 'pooled', the 'last_conv' tap (see
      `retrieval.mac_from_model`).
  """
  if tap not in retrieval.MAC_TAPS:
    raise InputError(f"MAC tap {tap!r} is not one of {', '.join(retrieval.MAC_TAPS)}")

  @jax.jit
  def fn(params, stats, images):
    return retrieval.mac_from_model(model, params, stats, normalize(images, mean, std), tap=tap)
  return fn


def describe(fn: Callable, params, stats, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """`fn`'s descriptors of `images`, in batches of `batch` (the last padded by repeating its
  final image, so every batch has one compiled shape)."""
  out = []
  for i in range(0, len(images), batch):
    chunk = images[i:i + batch]
    pad = batch - len(chunk) if len(images) > batch else 0
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(params, stats, chunk))[:len(chunk) - pad])
  return np.concatenate(out)


def embedded_task(data, queries: int, db_per_class: int, seed: int):
  """(query images, labels, database images, labels, num_classes) of a dataset: the database is
  the first `db_per_class` test images of each class, the queries a k-shot draw of `queries`
  per class from the train split (seed `seed`)."""
  db_idx = np.concatenate([np.flatnonzero(data.test.labels == c)[:db_per_class]
                           for c in range(data.test.num_classes)])
  q_idx, _ = sample_kshot(data.train.labels, queries, seed, num_classes=data.train.num_classes)
  return (data.train.images[q_idx], data.train.labels[q_idx], data.test.images[db_idx],
          data.test.labels[db_idx], data.train.num_classes)


def landmark(name: str) -> str:
  """Landmark of a revisited query name: 'all_souls_000013' -> 'all_souls'."""
  return re.sub(r"_\d+$", "", os.path.splitext(os.path.basename(name))[0])


def revisited_task(gnd_path: str, images_dir: str, ext: str, shape: Sequence[int],
                   allow_pickle: bool = False):
  """(query images cropped to their bbx, landmark labels, database images, the gnd list,
  number of landmarks) of a revisited ground truth (`retrieval.load_gnd`) and its images
  `images_dir/NAME{ext}`, each resized to `shape` (H, W, C)."""
  from jtransfer.data import images as imgs
  from PIL import Image
  gnd = retrieval.load_gnd(gnd_path, allow_pickle=allow_pickle)
  path = lambda n: os.path.join(images_dir, n + ext)
  size, channels = tuple(shape[:2]), shape[2]
  db = imgs.decode_images([path(n) for n in gnd["imlist"]], size=size, channels=channels,
                          mode="resize").images
  queries = []
  for name, g in zip(gnd["qimlist"], gnd["gnd"]):
    try:
      with Image.open(path(name)) as im:
        im.load()
        if g.get("bbx"):
          im = im.crop(tuple(int(round(v)) for v in g["bbx"][:4]))
        queries.append(imgs.decode_image(im, size=size, channels=channels, mode="resize"))
    except OSError as e:
      raise InputError(f"query image {path(name)!r} cannot be read: {e}") from None
  names = sorted({landmark(n) for n in gnd["qimlist"]})
  labels = np.array([names.index(landmark(n)) for n in gnd["qimlist"]], np.int32)
  return np.stack(queries), labels, db, gnd["gnd"], len(names)


def check_image_size(source: transfer.Source, size: Optional[Sequence[int]]
                     ) -> tuple[int, int, int]:
  """The input shape to use for (H, W) `size` (None: the source's); raises InputError when the
  target model's params depend on it (a VGG that flattens its last map into the head)."""
  shape = tuple(source.input_shape) if not size else (*size, source.input_shape[2])
  if shape == tuple(source.input_shape):
    return shape
  model = transfer.target_model(source, 2)
  shapes = lambda s: jax.tree.map(lambda a: a.shape, jax.eval_shape(
      lambda: models.init_model(model, jax.random.PRNGKey(0), s)))
  try:
    fits = shapes(shape) == shapes(tuple(source.input_shape))
  except Exception as e:  # pylint: disable=broad-except  (Flax raises many types)
    raise InputError(f"--image-size {shape[:2]} does not fit {source.arch}: {e}") from None
  if not fits:
    raise InputError(f"--image-size {shape[:2]}: {source.arch} flattens its last map into the "
                     f"head, so it needs the source's input size {source.input_shape[:2]}")
  return shape


def score(query_desc: np.ndarray, db_desc: np.ndarray, query_labels=None, db_labels=None,
          gnd: Optional[Sequence[dict]] = None) -> dict[str, float]:
  """mAP of a ranking by cosine similarity: {'easy', 'medium', 'hard'} under a revisited `gnd`,
  else {'map'} with the database images of each query's label as its positives (Easy)."""
  ranks = retrieval.rank_database(query_desc, db_desc)
  if gnd is not None:
    return {s: r.map for s, r in retrieval.evaluate_revisited(ranks, gnd).items()}
  g = retrieval.labels_to_gnd(query_labels, db_labels)
  return {"map": retrieval.compute_map(ranks, retrieval.revisited_setup(g, "easy")).map}
