"""README's python code blocks run as written, in order, in one namespace, so they cannot rot."""
import contextlib
import inspect
import io
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks(text: str) -> list[str]:
  """The bodies of the ```python fenced blocks of a markdown text, in order."""
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_extracts_blocks():
  text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
  assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_readme_api_calls_exist_and_bind():
  """Fast guard (the full run below is slow): every `api.NAME(...)` the README calls exists and
  its keyword arguments are parameters of NAME."""
  from jtransfer import api
  with open(README) as f:
    code = "".join(python_blocks(f.read()))
  compile(code, README, "exec")
  calls = re.findall(r"api\.(\w+)\(([^()]*(?:\([^()]*\)[^()]*)*)\)", code)
  assert {name for name, _ in calls} >= {"fit", "evaluate", "tune", "score_sources",
                                         "prune_cwl", "random_source"}
  for name, args in calls:
    fn = getattr(api, name)
    params = inspect.signature(fn).parameters
    outer = re.sub(r"\([^()]*\)", "()", args)  # keywords of nested calls are theirs
    for kw in re.findall(r"(?:^|,)\s*(\w+)=", outer):
      assert kw in params, f"README calls api.{name} with {kw}="


@pytest.mark.slow
def test_readme_python_blocks_run():
  with open(README) as f:
    blocks = python_blocks(f.read())
  assert any("api.fit(" in b for b in blocks) and any("score_sources" in b for b in blocks)
  namespace: dict = {}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    for block in blocks:
      exec(compile(block, README, "exec"), namespace)  # noqa: S102 (our own README)
  # the "Use from Python" example did what it says
  assert 0.0 <= namespace["api"].evaluate(namespace["result"], namespace["x_val"],
                                          namespace["y_val"]) <= 1.0
  assert set(namespace["best"].table[0]) == {"lr", "val_acc"}
  assert namespace["pruned"].params_kept <= namespace["pruned"].params_total
  assert "'vgg_s': {'logme'" in out.getvalue()
