"""The benchmark code runs on a tiny setting (timings are not tested)."""
from bench import run


def test_bench_runs_tiny(tmp_path):
  out = tmp_path / "r.md"
  assert run.main(["--tiny", "--archs", "vgg_s", "--out", str(out)]) == 0
  text = out.read_text()
  for strategy in run.STRATEGIES:
    assert f"| vgg_s | {strategy} |" in text
