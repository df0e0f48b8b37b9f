"""Ctrl-C and SIGTERM during training: stop, and save a checkpoint that resumes exactly.

A run stopped by a signal saves the state of its last finished step, so that `--resume` continues as
if nothing had happened. The catch is time: under `accelerate launch` the launcher answers a signal
by sending the worker SIGTERM and, 5 s later (torchrun, with several processes: 30 s), SIGKILL. A
step can take longer than that (a large batch on a small GPU, any real batch on a CPU), so waiting
for the step to finish can lose the run. Instead, a signal that comes in the middle of a step
*abandons* it: the forward and backward are cut short, the partial gradients are thrown away (they
are only applied by the optimizer at the end of the step), and the random-number generators are put
back to where they stood when the step began (dropout drew from them). Model, optimizer and RNG are
then exactly those of the last finished step, which is what the checkpoint holds.

How a signal cuts a step short: Python runs a signal handler in the main thread between two of its
bytecodes. The handler raises `StepAbandoned`, which unwinds the forward or backward like any
exception. A long operation in C (one matmul; a whole backward pass without gradient checkpointing,
whose recomputation is Python code the handler can interrupt) finishes first.

Several processes: a process cannot abandon its step alone, the others would wait for it in the
gradient all-reduce forever. There the request is agreed on at the loop's next log line or
checkpoint (`StopOnSignal.agreed`), and the step in progress finishes.

Two signals: Ctrl-C in a terminal sends SIGINT to every process of the job, and `accelerate launch`,
which gets it too, then sends its worker a SIGTERM. That SIGTERM is the launcher's echo of the same
Ctrl-C, not a second request. Any other second signal (Ctrl-C twice, SIGTERM twice) stops at once,
without saving, and exits 128 + its number (130, 143).
"""

import os
import random
import signal
import sys
import time

import numpy as np
import torch

from yoda_raw.errors import StopAtOnce

# A SIGTERM this soon after a SIGINT is a launcher passing the Ctrl-C on (accelerate sends it at once).
ECHO_SECONDS = 3.0
# Tests only: seconds every abandonable step but a run's first sleeps, to make a slow step without a
# big model (the first step runs at full speed, so that a test can wait for its metrics line).
SLOW_STEP_ENV = "YODA_RAW_TEST_SLOW_STEP"


class StepAbandoned(BaseException):
    """Raised by the signal handler inside an abandonable step. A BaseException, as KeyboardInterrupt
    is: library code that catches Exception must not swallow it."""


class StopOnSignal:
    """Turn Ctrl-C (SIGINT) and SIGTERM into a request to stop and save a checkpoint.

    On one process a signal that comes during `abandonable(...)` abandons that step (see the module
    docstring); one that comes between steps lets the step finish. The handlers are in place inside
    a `with` block only, and the ones before are given back after it.
    """

    def __init__(self, num_processes: int = 1):
        self.requested, self.signum, self.abandoned = False, None, False
        self._can_abandon = num_processes == 1
        self._in_step, self._first_at, self._steps = False, 0.0, 0
        self._slow_step_s = float(os.environ.get(SLOW_STEP_ENV) or 0)  # tests only

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            echo = signum == signal.SIGTERM and self.signum == signal.SIGINT
            if echo and time.monotonic() - self._first_at < ECHO_SECONDS:
                return  # the launcher passing the same Ctrl-C on: already being handled
            raise StopAtOnce(signum)
        self.requested, self.signum, self._first_at = True, signum, time.monotonic()
        name = signal.Signals(signum).name
        # Not from the frame of `abandonable` itself: an exception there would escape its try block.
        if self._in_step and self._can_abandon and frame.f_code is not _ABANDONABLE_CODE:
            print(
                f"\n{name}: abandoning the unfinished step, then saving a checkpoint of the last one", file=sys.stderr
            )
            raise StepAbandoned
        print(f"\n{name}: finishing this step, then saving a checkpoint", file=sys.stderr)

    def abandonable(self, forward_backward, *args):
        """`forward_backward(*args)`, or None when a signal abandoned it: then `self.abandoned` is
        True, the random-number generators are as they were before the call, and the caller must
        zero the partial gradients and save the last finished step."""
        states = rng_states() if self._can_abandon else None  # only a step that can be abandoned needs them
        self._in_step = True
        try:
            self._steps += 1
            if self._slow_step_s and self._steps > 1:
                _slow_step_for_tests(self._slow_step_s)
            return forward_backward(*args)
        except StepAbandoned:
            set_rng_states(states)
            self.abandoned = True
            return None
        finally:
            self._in_step = False

    def agreed(self, accelerator, at_sync_point: bool) -> bool:
        """Whether to stop after this step, the same answer on every process. A signal can reach one
        process only (a scheduler, a `kill` by hand); if that one alone stopped to save, the others
        would wait for it forever in their next all-reduce. So with several processes they agree
        through an all-reduce, at the loop's sync points only (a log line, a checkpoint): a stop
        comes at the next one of those, and the steps between stay free of host syncs. They agree on
        the signal too, the largest number any of them got (SIGTERM, 15, over SIGINT, 2), so that
        every process exits with the same status."""
        if accelerator.num_processes == 1:
            return self.requested
        if not at_sync_point:
            return False
        signum = torch.tensor(self.signum or 0, device=accelerator.device)
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        agreed = int(signum.item())  # sync point
        if agreed:
            self.signum = agreed
        return self.signum is not None


_ABANDONABLE_CODE = StopOnSignal.abandonable.__code__


def _slow_step_for_tests(seconds: float) -> None:
    # Short sleeps: the handler runs between them (and inside time.sleep, which a signal interrupts).
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


def rng_states() -> dict:
    """Every random-number generator a step draws from, as Accelerate's save_state saves them."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
