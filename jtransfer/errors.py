"""Error types that carry a message meant for the person who gave the input.

Every check on user input raises `InputError` (a `ValueError`) with one sentence naming the
input and what was expected, so command-line entry points can print it without a traceback.
"""


class InputError(ValueError):
  """Bad user input: a config, a flag, a data path, a checkpoint, an array of the wrong shape."""


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss or gradient.

  Attributes:
    step: the optimiser step at which it happened.
    terms: names of the loss terms that were non-finite (e.g. ``['ce']``, ``['grad']``).
  """

  def __init__(self, step: int, terms: list[str], message: str | None = None):
    self.step = int(step)
    self.terms = list(terms)
    super().__init__(message or f"non-finite value at step {self.step} in: {', '.join(self.terms)}")
