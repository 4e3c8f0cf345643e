"""protocol.run.train_run on a scalar 'model' (no compilation): fixed steps, validation patience
keeping the best state, finalize applied to the kept params with the starting params."""
import dataclasses

import numpy as np

from jtransfer.protocol import Budget
from jtransfer.protocol.run import train_run


@dataclasses.dataclass(frozen=True)
class State:
  step: int
  params: dict

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


def step_fn(state, batch):  # params['w'] grows by the batch each step
  return State(state.step + 1, {"w": state.params["w"] + batch}), {"finite": True, "loss": 0.0}


def test_fixed_steps_and_finalize():
  start = State(0, {"w": np.float64(1.0)})
  out = train_run(start, step_fn, lambda t: 1.0, steps=4,
                  finalize=lambda p, p0: {"w": 0.5 * p["w"] + 0.5 * p0["w"]})
  assert out.info == dict(steps=4, best_step=4, stopped="fixed", curve=[])
  assert out.state.params["w"] == 0.5 * 5.0 + 0.5 * 1.0 and out.initial["w"] == 1.0


def test_patience_keeps_the_best_state():
  # validation accuracy peaks at w = 3 (step 2) and falls after: patience 2 stops at step 4
  acc = lambda st: -abs(float(st.params["w"]) - 3.0)
  out = train_run(State(0, {"w": 1.0}), step_fn, lambda t: 1.0, steps=100,
                  budget=Budget(cap=10, eval_every=1, patience=2), val_acc=acc,
                  keep_initial=True)
  assert (out.info["best_step"], out.info["steps"], out.info["stopped"]) == (2, 4, "patience")
  assert out.state.params["w"] == 3.0 and out.initial == {"w": 1.0}
  # no val_acc: the budget cannot apply, the run trains `steps` and keeps the last state
  out = train_run(State(0, {"w": 1.0}), step_fn, lambda t: 1.0, steps=3,
                  budget=Budget(cap=10, eval_every=1, patience=2))
  assert out.state.params["w"] == 4.0 and out.initial is None
