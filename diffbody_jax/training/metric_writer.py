"""What a run reports: a progress bar on stdout, metrics.jsonl and TensorBoard event files in the workdir.

Each logged step is one JSON object per line in `<workdir>/metrics.jsonl`:
  {"step": 120, "loss": 0.0123, "grad_norm": 0.8, "learning_rate": 1e-4, "step_time_s": 0.21,
   "examples_per_s": 152.4, "examples_per_s_per_device": 19.05, "records": [...], ...}
and the scalars go to `<workdir>/tensorboard/` (tensorboardX). Only process 0 writes. A resumed run drops the
lines of steps after the checkpoint it resumed from (a killed run may have logged them), so the file stays one
line per step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm


def _plain(value: Any):
    value = np.asarray(value)
    if value.ndim == 0:
        return value.item()
    return value.tolist()


class MetricWriter:
    def __init__(self, workdir: str | Path, start_step: int, total_steps: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.bar = None
        self.tensorboard = None
        if not self.enabled:
            return
        self._truncate_after(start_step)
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.bar is not None:
            self.bar.close()
