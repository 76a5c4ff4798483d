"""Subprocess worker for the crash and preemption tests.

    python _worker.py OUTPUT_DIR MODE MARKER

MODE ``block-in-save``: train 8 steps saving every 2; inside the second save (after some files of
checkpoint-4 are written) touch MARKER and block, so the parent can SIGKILL it mid-save.
MODE ``wait-for-signal``: train 8 steps; at the end of step 3 touch MARKER and wait until the parent's
signal has been received, then let the Trainer honour it (save at step 3, exit 0).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _helpers import Tiny, make_args, make_data  # noqa: E402

from optsched.trainer import Trainer, TrainerCallback  # noqa: E402
from optsched.trainer import checkpoint as ckpt  # noqa: E402

RUN = dict(max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=3)


def main() -> int:
    torch.set_num_threads(1)
    out, mode, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    callbacks = []
    if mode == "block-in-save":
        original = ckpt.save_rng_state
        calls = {"n": 0}

        def blocking_save_rng_state(directory, ctx):
            calls["n"] += 1
            path = original(directory, ctx)
            if calls["n"] == 2:  # checkpoint-4: model, optimizer, scheduler written; state not yet
                marker.write_text(str(directory))
                time.sleep(120)
            return path

        ckpt.save_rng_state = blocking_save_rng_state
    elif mode == "wait-for-signal":

        class WaitForSignal(TrainerCallback):
            def __init__(self) -> None:
                self.trainer = None

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    marker.write_text("step 3")
                    deadline = time.time() + 60
                    while not self.trainer._preemption.requested and time.time() < deadline:
                        time.sleep(0.01)

        cb = WaitForSignal()
        callbacks.append(cb)
    else:
        raise ValueError(f"mode={mode!r}; accepted: 'block-in-save', 'wait-for-signal'.")
    trainer = Trainer(Tiny(), make_args(out, **RUN), train_dataset=make_data(), callbacks=callbacks)
    for cb in callbacks:
        cb.trainer = trainer
    result = trainer.train()
    print(f"done step={result.global_step} preempted_by={trainer.preempted_by}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
