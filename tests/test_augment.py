"""Augmentation (issue 18 item 1): the crop boxes and flips follow their recipe's ranges on a
fixed seed, crops resample the stored pixels exactly, and the stream is a pure function of the
step's rng (so a resumed run sees the same batches)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer.data import augment as aug
from jtransfer.errors import InputError


def test_parse_recipes_and_refuse_the_rest():
  assert str(aug.parse("rrc+flip")) == "rrc+flip" and aug.parse("none").active is False
  assert aug.parse("flip") == aug.Recipe(flip=True) and aug.parse("crop").kind == "crop"
  assert aug.parse("pad2+flip") == aug.Recipe(kind="pad", flip=True, pad=2)
  assert str(aug.parse("pad+flip")) == "pad4+flip" and str(aug.parse("pad0")) == "pad0"
  for bad in ("rrc+crop", "blur", "", "none+flip", "pad+crop", "padx", "pad-1"):
    with pytest.raises(InputError, match="--augment"):
      aug.parse(bad)


def test_rrc_boxes_lie_in_the_scale_and_ratio_ranges():
  r = aug.parse("rrc")
  boxes = np.asarray(aug.crop_boxes(jax.random.PRNGKey(0), 4000, 28, 28, r))
  y0, x0, h, w = boxes.T
  area, ratio = h * w / 28 ** 2, w / h
  whole = (h == 28) & (w == 28)  # the fallback when no candidate fits
  assert whole.mean() < 0.01
  ok = ~whole
  assert area[ok].min() >= 0.08 - 1e-6 and area[ok].max() <= 1 + 1e-6
  assert ratio[ok].min() >= 3 / 4 - 1e-6 and ratio[ok].max() <= 4 / 3 + 1e-6
  assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 28 + 1e-4).all() and \
      (x0 + w <= 28 + 1e-4).all()
  # log-uniform ratio: as many boxes wider than tall as taller than wide
  assert abs(np.mean(ratio[ok] > 1) - 0.5) < 0.03


def test_crop_boxes_are_the_resized_image_cropped():
  boxes = np.asarray(aug.crop_boxes(jax.random.PRNGKey(1), 1000, 28, 28, aug.parse("crop")))
  np.testing.assert_allclose(boxes[:, 2:], 28 * 28 / 32, rtol=1e-6)  # 32 px shorter side -> 28
  assert boxes[:, :2].min() >= 0 and boxes[:, :2].max() <= 28 - 28 * 28 / 32 + 1e-5
  assert boxes[:, 0].std() > 0.8  # positions spread over the free range (uniform: 1.0)


def test_crops_resample_exactly_and_flips_half_the_images():
  ramp = jnp.tile(jnp.arange(28, dtype=jnp.float32)[None, :, None], (28, 1, 1))
  out = aug._resample(ramp, jnp.array([0.0, 4.0, 28.0, 14.0]), (28, 28))
  x = np.arange(28)
  np.testing.assert_allclose(out[10, 1:-1, 0], (4 + (x + 0.5) * 14 / 28 - 0.5)[1:-1], atol=1e-5)
  images = jnp.tile(ramp[None], (2000, 1, 1, 1))
  flipped = aug.augment(images, jax.random.PRNGKey(2), aug.parse("flip"))
  is_flipped = np.asarray(flipped[:, 0, 0, 0] == 27.0)
  assert abs(is_flipped.mean() - 0.5) < 0.04
  np.testing.assert_array_equal(flipped[is_flipped][:, :, ::-1], images[is_flipped])
  np.testing.assert_array_equal(flipped[~is_flipped], images[~is_flipped])
  np.testing.assert_array_equal(aug.augment(images[:3], jax.random.PRNGKey(0), aug.parse("none")),
                                images[:3])


def test_pad_crop_matches_numpy():
  """CIFAR's RandomCrop(padding=N): zero padding, then a whole-pixel crop of the stored size."""
  g = np.random.default_rng(3)
  images = g.integers(0, 255, (5, 6, 7, 2)).astype(np.uint8)
  pad = 2
  offsets = g.integers(0, 2 * pad + 1, (5, 2))
  got = np.asarray(aug.pad_crop(jnp.asarray(images), jnp.asarray(offsets), pad))
  assert got.dtype == np.uint8
  for i in range(5):
    padded = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
    np.testing.assert_array_equal(
        got[i], padded[offsets[i, 0]:offsets[i, 0] + 6, offsets[i, 1]:offsets[i, 1] + 7])


def test_pad_recipe_shifts_within_its_padding_and_flips():
  images = jnp.asarray(np.random.default_rng(4).integers(1, 255, (64, 6, 6, 1)), jnp.uint8)
  rng = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(aug.augment(images, rng, aug.parse("pad0")), images)
  shifted = np.asarray(aug.augment(images, rng, aug.parse("pad2")))
  src = np.asarray(images, np.float32)
  for out, im in zip(shifted, src):  # each output is its image shifted by (dy, dx) in [-2, 2]
    padded = np.pad(im, ((2, 2), (2, 2), (0, 0)))
    assert any(np.array_equal(out, padded[dy:dy + 6, dx:dx + 6])
               for dy in range(5) for dx in range(5))
  assert not np.array_equal(shifted, src)
  flipped = np.asarray(aug.augment(images, rng, aug.parse("pad0+flip")))
  mirror = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, src)]
  same = [np.array_equal(f, i) for f, i in zip(flipped, src)]
  assert all(a or b for a, b in zip(same, mirror)) and any(mirror) and any(same)
  with pytest.raises(InputError, match="stored size"):
    aug.augment(images, rng, aug.parse("pad2"), (4, 4))


def test_the_stream_is_a_pure_function_of_the_rng():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 28, 28, 1)), jnp.uint8)
  r = aug.parse("rrc+flip")
  a = aug.augment(images, jax.random.PRNGKey(5), r)
  np.testing.assert_array_equal(a, aug.augment(images, jax.random.PRNGKey(5), r))
  assert not np.array_equal(a, aug.augment(images, jax.random.PRNGKey(6), r))
  assert a.dtype == jnp.float32 and float(a.min()) >= 0 and float(a.max()) <= 255


def test_wrap_loss_feeds_augmented_images_and_a_fresh_key():
  seen = {}

  def loss_fn(params, stats, batch, rng):
    seen["image"], seen["rng"] = batch["image"], rng
    return jnp.float32(0), ({}, stats)

  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 28, 28, 1)), jnp.uint8)
  r = aug.parse("crop+flip")
  aug.wrap_loss(loss_fn, r)({}, {}, {"image": images}, jax.random.PRNGKey(3))
  k_aug, k_loss = jax.random.split(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(seen["image"], aug.augment(images, k_aug, r))
  np.testing.assert_array_equal(seen["rng"], k_loss)
  assert aug.wrap_loss(loss_fn, aug.parse("none")) is loss_fn


@pytest.mark.slow
def test_fewshot_grid_with_augmentation(tiny_source_dir, tmp_path, capsys):
  """Every strategy trains on augmented batches (the frozen-feature cache off, and said so);
  the grid is deterministic, so a grid resumed after a kill (runs are redone whole) equals the
  uninterrupted one; a resume with another recipe, or an unknown recipe, is refused."""
  import json
  from experiments import fewshot
  base = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1,2", "--shots", "2", "--repeats", "1", "--steps", "4", "--eval-every", "2",
          "--patience", "2", "--test-per-class", "4", "--val-per-class", "2", "--lrs", "1e-3",
          "--tune-repeats", "0", "--no-paper-grid"]
  argv = base + ["--strategies", "freeze,finetune", "--augment", "rrc+flip"]
  a, b = tmp_path / "a", tmp_path / "b"
  assert fewshot.main(argv + ["--out", str(a)]) == 0
  assert "frozen features not cached (--augment rrc+flip)" in capsys.readouterr().err
  assert fewshot.main(argv + ["--out", str(b), "--quiet"]) == 0
  ra = json.loads((a / "results.json").read_text())
  assert ra == json.loads((b / "results.json").read_text())
  assert all(r["augment"] == "rrc+flip" and r["status"] == "ok" for r in ra)
  assert "Training images augmented on device: rrc+flip." in (a / "report.md").read_text()
  assert fewshot.main(argv[:-2] + ["--augment", "flip", "--out", str(a), "--resume",
                                   "--quiet"]) == 2
  assert fewshot.main(base + ["--strategies", "freeze", "--augment", "blur", "--out",
                              str(tmp_path / "d"), "--quiet"]) == 2


# delta behind -m slow (24 s on the suite's cold cache): delta_noatt goes through the same
# live-source branch of the loss; delta adds only the attention weights.
@pytest.mark.parametrize("name", [pytest.param("delta", marks=pytest.mark.slow), "delta_noatt"])
def test_delta_on_augmented_batches_uses_the_live_source_forward(tiny_source_dir, name):
  """DELTA keeps its training images' source maps in a table; an augmented batch matches no
  stored image, so its maps come from the live source forward: the loss equals the one
  computed with no table at all."""
  from jtransfer.methods import delta, transfer
  source = transfer.load_source(tiny_source_dir("vgg_s"))
  setup = transfer.get_strategy(name).build(source, 3, 10)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (6, 28, 28, 1), dtype=np.uint8)
  labels = np.array([0, 1, 2, 0, 1, 2])
  params, stats = setup.init(0, images, labels)
  assert params[delta.FROZEN_KEY].get("source") is not None  # the table is there
  # move the network away from the source, so the feature term is not 0
  params = {k: (v if k == delta.FROZEN_KEY else jax.tree.map(lambda a: a * 1.2, v))
            for k, v in params.items()}
  no_table = dict(params, **{delta.FROZEN_KEY: {k: v for k, v in
                                                params[delta.FROZEN_KEY].items()
                                                if k != "source"}})
  batch = {"image": images, "label": labels}
  loss = aug.wrap_loss(setup.loss_fn, aug.parse("rrc+flip"))
  key = jax.random.PRNGKey(4)
  with_table = loss(params, stats, batch, key)
  live = loss(no_table, stats, batch, key)
  assert float(with_table[1][0]["reg"]) > 0
  np.testing.assert_allclose(float(with_table[0]), float(live[0]), rtol=1e-5)
  np.testing.assert_allclose(float(with_table[1][0]["reg"]), float(live[1][0]["reg"]), rtol=1e-5)
  # unaugmented, the batch is found in the table: same numbers as the live forward too
  plain_table = setup.loss_fn(params, stats, batch, key)
  plain_live = setup.loss_fn(no_table, stats, batch, key)
  np.testing.assert_allclose(float(plain_table[0]), float(plain_live[0]), rtol=1e-5)
  assert abs(float(plain_table[1][0]["reg"]) - float(with_table[1][0]["reg"])) > 1e-6


# ----------------------------------------------------------------------------- stored size
def test_center_view_is_resize_then_center_crop():
  rng = np.random.default_rng(1)
  stored = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
  # 256 stored, 224 input, resize 256/224: the shorter side is already 256, so the view is
  # the exact centre 224 x 224 (torchvision's Resize(256) + CenterCrop(224)).
  np.testing.assert_array_equal(aug.center_view(stored, (224, 224), 256 / 224),
                                stored[:, 16:240, 16:240])
  # 64 stored, 28 input, resize 32/28: an antialiased resize to 32, then the centre 28.
  small = rng.integers(0, 256, (5, 64, 64, 1), dtype=np.uint8)
  resized = jax.image.resize(small.astype(np.float32), (5, 32, 32, 1), "linear", antialias=True)
  want = np.clip(np.round(np.asarray(resized)[:, 2:30, 2:30]), 0, 255)
  got = aug.center_view(small, (28, 28), 32 / 28, batch_size=2)  # padded last batch
  assert got.dtype == np.uint8 and got.shape == (5, 28, 28, 1)
  assert np.abs(got.astype(int) - want).max() <= 1
  assert aug.center_view(small, (64, 64)) is small  # stored = input: unchanged


def test_crops_of_larger_stored_images_have_the_input_size():
  rng = np.random.default_rng(2)
  stored = jnp.asarray(rng.integers(0, 256, (64, 40, 40, 1)), jnp.uint8)
  key = jax.random.PRNGKey(3)
  for recipe in ("rrc+flip", "crop", "flip", "none"):
    out = aug.augment(stored, key, aug.parse(recipe), (28, 28))
    assert out.shape == (64, 28, 28, 1) and float(out.min()) >= 0 and float(out.max()) <= 255
  # 'crop': the stored shorter side resized to 32/28 x 28 = 32 px, then a 28 px crop: boxes
  # of 28 * 40 / 32 = 35 stored pixels, inside the image.
  boxes = np.asarray(aug.crop_boxes(key, 64, 40, 40, aug.parse("crop"), (28, 28)))
  np.testing.assert_allclose(boxes[:, 2:], 35.0)
  assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] <= 5.0 + 1e-5).all()
  # rrc boxes stay inside the stored image, their area within the scale range of it
  r = aug.parse("rrc")
  boxes = np.asarray(aug.crop_boxes(key, 2000, 40, 40, r, (28, 28)))
  assert (boxes[:, 0] + boxes[:, 2] <= 40 + 1e-4).all() and (boxes[:, 1] + boxes[:, 3] <= 40 + 1e-4).all()
  area = boxes[:, 2] * boxes[:, 3] / 1600
  assert area.min() >= r.scale[0] - 1e-5 and area.max() <= r.scale[1] + 1e-5
  # no crop recipe: the test-time view, so 'none' at a new size equals center_view
  np.testing.assert_allclose(np.asarray(aug.augment(stored, key, aug.parse("none"), (28, 28))),
                             aug.center_view(np.asarray(stored), (28, 28)), atol=0.5 + 1e-4)


@pytest.mark.slow  # 15 s; crops of stored images are tested on arrays above
def test_fewshot_with_stored_size(tiny_source_dir, tmp_path):
  """Targets stored at 36 px for the 28 px source: runs train on crops of the stored pixels,
  evaluate on centre views, record the stored size, and refuse a resume at another size."""
  import json
  from experiments import fewshot
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1,2", "--shots", "2", "--repeats", "1", "--steps", "4", "--eval-every", "2",
          "--patience", "2", "--test-per-class", "4", "--val-per-class", "2", "--lrs", "1e-3",
          "--tune-repeats", "0", "--no-paper-grid", "--strategies", "freeze,finetune",
          "--augment", "rrc+flip", "--stored-size", "36", "--quiet"]
  out = tmp_path / "s"
  assert fewshot.main(argv + ["--out", str(out)]) == 0
  from jtransfer.study.records import rows
  records = rows(json.loads((out / "results.json").read_text()))
  assert records and all(r["stored_size"] == 36 and r["status"] == "ok" for r in records)
  assert "stored at 36 px" in (out / "report.md").read_text()
  assert fewshot.main(argv[:-3] + ["--stored-size", "40", "--quiet", "--out", str(out),
                                   "--resume"]) == 2
  assert fewshot.main(argv[:-3] + ["--stored-size", "20", "--quiet", "--out",
                                   str(tmp_path / "t")]) == 2
  pad_argv = [a if a != "rrc+flip" else "pad2+flip" for a in argv]
  assert fewshot.main(pad_argv + ["--out", str(tmp_path / "p")]) == 2  # crops to the stored size
  assert not (tmp_path / "p" / "results.json").exists()
