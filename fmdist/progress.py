"""Training progress on rank 0: a tqdm bar per epoch in a terminal, plain periodic lines elsewhere.

SLURM logs and CI capture output to files, where a redrawn bar becomes thousands of lines;
there, a line every `every` seconds with images/s and the time left says the same.
"""

from __future__ import annotations

import sys
import time

import torch

from fmdist import distributed


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Reports nothing; the base of the two displays and what other ranks use."""

    def start_epoch(self, epoch: int, steps_done: int, steps: int) -> None:
        pass

    def step(self, step: int, loss: torch.Tensor) -> None:
        pass

    def end_epoch(self) -> None:
        pass


class _Timed(Progress):
    def __init__(self, epochs: int, images_per_step: int):
        self.epochs, self.images_per_step = epochs, images_per_step

    def start_epoch(self, epoch: int, steps_done: int, steps: int) -> None:
        self.epoch, self.steps, self.first_step = epoch, steps, steps_done
        self.started = time.perf_counter()

    def images_per_second(self, step: int) -> float:
        elapsed = time.perf_counter() - self.started
        return (step - self.first_step) * self.images_per_step / elapsed if elapsed > 0 else 0.0


class BarProgress(_Timed):
    def start_epoch(self, epoch: int, steps_done: int, steps: int) -> None:
        from tqdm import tqdm

        super().start_epoch(epoch, steps_done, steps)
        self.bar = tqdm(total=steps, initial=steps_done, desc=f"epoch {epoch}/{self.epochs}", unit="batch",
                        dynamic_ncols=True, leave=True)  # fmt: skip

    def step(self, step: int, loss: torch.Tensor) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss.item():.4f}", images_per_s=f"{self.images_per_second(step):,.0f}",
                             refresh=False)  # fmt: skip

    def end_epoch(self) -> None:
        self.bar.close()


class LineProgress(_Timed):
    def __init__(self, epochs: int, images_per_step: int, every: float):
        super().__init__(epochs, images_per_step)
        self.every = every

    def start_epoch(self, epoch: int, steps_done: int, steps: int) -> None:
        super().start_epoch(epoch, steps_done, steps)
        self.last_report = self.started

    def step(self, step: int, loss: torch.Tensor) -> None:
        now = time.perf_counter()
        if now - self.last_report < self.every and step < self.steps:
            return
        self.last_report = now
        rate = (step - self.first_step) / (now - self.started) if now > self.started else 0.0
        left_in_epoch = (self.steps - step) / rate if rate else 0.0
        left_in_run = left_in_epoch + (self.epochs - self.epoch) * self.steps / rate if rate else 0.0
        print(
            f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps} ({100 * step / self.steps:.0f}%) "
            f"loss {loss.item():.4f} {self.images_per_second(step):,.0f} images/s "
            f"ETA epoch {_duration(left_in_epoch)} run {_duration(left_in_run)}",
            flush=True,
        )


def make_progress(mode: str, every: float, epochs: int, images_per_step: int) -> Progress:
    """The display for this rank: only rank 0 shows anything; `auto` picks a bar for a terminal."""
    if mode == "off" or not distributed.is_main_process():
        return Progress()
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return BarProgress(epochs, images_per_step)
    return LineProgress(epochs, images_per_step, every)
