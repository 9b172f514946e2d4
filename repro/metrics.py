"""Where a run stands, and its metrics log (JSON lines, one per step and one per epoch): the one
module that writes metrics.jsonl and reads it back."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from repro.atomic import atomic_write


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # steps of it already taken
    global_step: int = 0  # steps taken since the start of training


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsLog:
    """Appends JSON objects to `path` (rank 0 only). Each line is flushed when written, so a crash
    loses at most the line being written; `read_metrics` ignores a cut last line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int, epoch: int) -> None:
        """On resume: drop the records of steps the checkpoint does not include (they are redone), and
        the end of any epoch from `epoch` on (the checkpoint's epoch had not ended, even when all its
        steps were taken: a stop at --max-steps on its last step)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
            if rec.get("step", 0) <= step and not (rec.get("kind") == "epoch" and rec.get("epoch", -1) >= epoch):
                kept.append(line)
        atomic_write(self.path, lambda f: f.write("".join(k + "\n" for k in kept)), binary=False)


class StepLosses:
    """The steps' losses on their way to metrics.jsonl and the progress line. A loss stays on the device
    (reading it makes the host wait) until `read`, at a check point, reads those pending in one go and
    writes a "step" record for each; `line` then gives the last loss and the speed since the last line,
    and writes a "speed" record. Rank 0 alone keeps them (its log is the enabled one)."""

    def __init__(self, log: MetricsLog, step: int):
        self.log = log
        self.pending: list[tuple[int, Tensor]] = []  # (step, loss) not read yet
        self.last: float | None = None  # the latest loss read since the last line
        self.line_step, self.line_time = step, time.perf_counter()  # where the last line was

    def add(self, step: int, loss: Tensor | None) -> None:
        """Step `step`'s loss (None: the step had no image on this pair, nothing to log)."""
        if loss is not None and self.log.enabled:
            self.pending.append((step, loss))

    def read(self, epoch: int, lr: float) -> int | None:
        """Write the pending steps' records; the first of them whose loss is not finite (None: none)."""
        if not self.pending:
            return None
        steps = [step for step, _ in self.pending]
        values = torch.stack([loss for _, loss in self.pending]).float().tolist()  # one device sync
        self.pending = []
        for step, value in zip(steps, values):
            self.log.write(kind="step", step=step, epoch=epoch, loss=value, lr=lr)
        self.last = values[-1]
        return next((step for step, value in zip(steps, values) if not math.isfinite(value)), None)

    def line(self, step: int, images_per_step: int) -> tuple[float, float] | None:
        """(the last loss, images per second) since the last line, which now ends here (None: no loss
        was read since it, no line to print)."""
        now, last = time.perf_counter(), self.last
        steps, seconds = step - self.line_step, max(now - self.line_time, 1e-9)
        self.line_step, self.line_time, self.last = step, now, None
        if last is None:
            return None
        rate = steps * images_per_step / seconds
        self.log.write(kind="speed", step=step, img_per_s=rate)
        return last, rate


def read_metrics(path) -> list[dict]:
    """Records of a JSONL log. A broken last line (a crash mid-write) is dropped; one elsewhere raises."""
    lines = [(n, raw) for n, raw in enumerate(Path(path).read_bytes().split(b"\n"), 1) if raw.strip()]
    records = []
    for i, (n, raw) in enumerate(lines):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {n} is not a JSON object")
        records.append(record)
    return records
