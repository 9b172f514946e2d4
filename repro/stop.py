"""The stop agreement: when a run stops, every rank stops at the same step boundary.

Three causes, one collective (`agree`): a stop signal on any rank (SIGTERM from a batch system, a
Ctrl-C: stop and save latest.pt), a loss that is not finite on rank 0, or weights that are not finite
on any rank (divergence: stop without saving). Each rank says what it saw; the sums are the same on
every rank, so all take the same branch.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from typing import Callable, Iterator

from repro.dist import Topology, all_reduce_sum


@dataclass
class Verdict:
    signalled: bool  # some rank was asked to stop: save and stop
    bad_loss_step: int  # the first step whose loss was not finite (0: none)
    bad_weights: bool  # some rank's weights are not finite


class StopAgreement:
    def __init__(self, topo: Topology, say: Callable[[str], None]):
        self.topo, self.say = topo, say
        self.signal: int | None = None  # the signal that asked for a stop on this rank (None: none did)

    def on_signal(self, signum, _frame) -> None:
        """SIGTERM (a batch system's cancel) or a first Ctrl-C: stop at the next step boundary that all
        ranks agree on, and save. A Ctrl-C after a stop request, or any signal after a Ctrl-C, stops at
        once without saving: torchrun passes a terminal's second Ctrl-C on as SIGTERM. (SIGTERM twice,
        as a batch system and torchrun may both send, still saves.)"""
        if self.signal is not None and signal.SIGINT in (self.signal, signum):
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum
        if signum == signal.SIGINT:
            self.say("Ctrl-C: stopping at the next step all ranks agree on, and saving latest.pt (Ctrl-C again: "
                     "stop now, unsaved)")

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """SIGTERM and SIGINT request a stop while the loop runs; the previous handlers afterwards."""
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agree(self, bad_loss_step: int | None = None, bad_weights: bool = False) -> Verdict:
        """Collective: what every rank saw, summed (one all-reduce of three numbers)."""
        seen = [float(self.signal is not None), float(bad_loss_step or 0), float(bad_weights)]
        signalled, bad_step, weights = all_reduce_sum(seen, self.topo)
        return Verdict(signalled > 0, int(bad_step), weights > 0)
