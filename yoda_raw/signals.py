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
gradient all-reduce forever. So the handler only takes note, and the processes agree, all at the
same points, whether any of them got a signal: before each micro-batch of a step and once after the
step. Where they agree to stop before a micro-batch, every process abandons the step there, as one
process does (no process is inside a collective then); after the step, they stop as they would at
its end. A stop therefore comes within one micro-batch (and the save), for any sensible batch well
inside torchrun's 30 s between SIGTERM and SIGKILL; with a micro-batch longer than that, lower
--batch-size and raise --grad-accum (the step stays the same). A signal that reaches one process
only (a `kill` by hand) stops them all at the same point too.

Agreeing costs one all-reduce of two numbers, over a gloo group of its own on the CPU: the GPU never
waits for it. The points must be the same on every process, in the same order among the other
collectives, or a process would wait for a partner that is waiting elsewhere. Two things make that
hold: the first micro-batch's agreement, before any forward, also agrees on the fewest micro-batches
any process has in this step (an epoch's last step can give one process fewer); and the agreements
in the middle of a step sit between the first forward (where DDP may broadcast buffers) and the last
backward (the gradient all-reduce), before the micro-batches every process has.

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
# Tests only: seconds each micro-batch sleeps (those of a run's first step aside), to make a slow step
# without a big model (the first step runs at full speed, so that a test can wait for its metrics line).
SLOW_STEP_ENV = "YODA_RAW_TEST_SLOW_STEP"


class StepAbandoned(BaseException):
    """Raised inside an abandonable step: by the signal handler (one process) or where the processes
    agreed to stop (several). A BaseException, as KeyboardInterrupt is: library code that catches
    Exception must not swallow it."""


class StopOnSignal:
    """Turn Ctrl-C (SIGINT) and SIGTERM into a request to stop and save a checkpoint.

    A signal that comes during `abandonable(...)` abandons that step (see the module docstring): at
    once on one process, at the next micro-batch on several. One that comes between steps lets the
    step finish. The handlers are in place inside a `with` block only, and the ones before are given
    back after it. The step calls `before_micro_batch` before each of its micro-batches.
    """

    def __init__(self, num_processes: int = 1):
        self.requested, self.signum, self.abandoned = False, None, False
        self._several = num_processes > 1
        self._group = None  # several processes: the gloo group they agree over, made at the first agreement
        self._fewest = 0  # several processes: the fewest micro-batches any of them has in this step
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
        self.requested, self._first_at = True, time.monotonic()
        self.signum = self.signum or signum  # the stop the processes already agreed on, if any, stays
        name = signal.Signals(signum).name
        if self._several:
            # Only noted: raising here could leave the other processes waiting in a collective.
            print(f"\n{name}: stopping with the other processes at the next micro-batch or step end", file=sys.stderr)
            return
        # Not from the frame of `abandonable` itself: an exception there would escape its try block.
        if self._in_step and frame.f_code is not _ABANDONABLE_CODE:
            print(
                f"\n{name}: abandoning the unfinished step, then saving a checkpoint of the last one", file=sys.stderr
            )
            raise StepAbandoned
        print(f"\n{name}: finishing this step, then saving a checkpoint", file=sys.stderr)

    def abandonable(self, forward_backward, *args):
        """`forward_backward(*args)`, or None when a signal abandoned it: then `self.abandoned` is
        True, the random-number generators are as they were before the call, and the caller must
        zero the partial gradients and save the last finished step."""
        states = rng_states()
        self._in_step = True
        try:
            self._steps += 1
            return forward_backward(*args)
        except StepAbandoned:
            set_rng_states(states)
            self.abandoned = True
            return None
        finally:
            self._in_step = False

    def before_micro_batch(self, index: int, count: int) -> None:
        """Called by the step before micro-batch `index` of its `count` on this process. On several
        processes, where they agree whether to stop: if any of them got a signal, every one raises
        StepAbandoned here, at the same point. The points, the same on every process (see the module
        docstring): before the first micro-batch, and before each later one up to the fewest any
        process has in this step."""
        # The first micro-batch's agreement also sets self._fewest, which bounds the later ones.
        if self._several and (index == 0 or index < self._fewest):
            if self._agree(count if index == 0 else None):
                raise StepAbandoned
        if self._slow_step_s and self._steps > 1:
            _slow_step_for_tests(self._slow_step_s)

    def agreed(self) -> bool:
        """Whether to stop after this step, the same answer on every process: called once at the end
        of every step. Several processes agree on it (a signal can reach one of them only), and on
        the signal too, the largest number any of them got (SIGTERM, 15, over SIGINT, 2), so that
        every process exits with the same status."""
        return self._agree() if self._several else self.requested

    def _agree(self, micro_batches: int | None = None) -> bool:
        """One all-reduce (MAX) over the CPU: the signal any process got, and with `micro_batches`
        the fewest micro-batches any process has in this step (as its negative), into self._fewest."""
        if self._group is None:
            # All processes get here at the same point, so they make the group together.
            self._group = torch.distributed.new_group(backend="gloo")
        values = torch.tensor([self.signum or 0, -(micro_batches or 0)], dtype=torch.long)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=self._group)
        signum, fewest = int(values[0]), -int(values[1])
        if micro_batches is not None:
            self._fewest = fewest
        if signum:
            self.signum = signum
        return bool(signum)


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
