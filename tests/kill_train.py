"""`scripts/train.py` that kills itself (SIGKILL) at a chosen point, for the crash tests:

    python tests/kill_train.py after-step N|during-save N TRAIN_ARGS...

after-step N: once step N is done and the checkpoints before it are written; during-save N: while step N's
checkpoint is being written."""

import os
import signal
import sys

from mtj.cli import run
from mtj.commands import train
from mtj.train import TrainHooks

point, at = sys.argv.pop(1), int(sys.argv.pop(1))


def kill(step, wait=lambda: None):
    if step == at:
        wait()
        os.kill(os.getpid(), signal.SIGKILL)


run(lambda: train.main(TrainHooks(after_step=kill) if point == "after-step" else TrainHooks(after_save=kill)))
