"""Metrics: DIR/metrics.jsonl and TensorBoard events as the run goes, DIR/curves.png at the end."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _tensorboard_writer():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch when it
    can, only to accept torch tensors: with this project's [all] extra that would load 0.7 GB of
    torch (its CUDA libraries) and 1.7 s of imports into every training process."""
    import sys
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX takes
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """metrics.jsonl + TensorBoard events in DIR; a no-op on processes other than 0."""

    def __init__(self, workdir: Path, active: bool, resume_step: int):
        self.active, self.path = active, workdir / "metrics.jsonl"
        self.tb = None
        if not active:
            return
        if self.path.exists():  # drop lines from after the checkpoint we resume from
            keep = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in keep))
            os.replace(tmp, self.path)
        summary_writer = _tensorboard_writer()
        self.tb = summary_writer(str(workdir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        for k, v in scalars.items():
            if isinstance(v, (int, float)):  # lists and dicts (skipped files) go to jsonl only
                self.tb.add_scalar(k, v, int(step))
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_metrics(workdir: Path) -> Path | None:
    """DIR/curves.png: training loss, train and eval top-1/top-5, learning rate."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    # A Figure of its own, not pyplot's: nothing global changes (an in-process caller's pyplot
    # backend and open figures stay as they were), and pyplot's import is not paid.
    from matplotlib.figure import Figure
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    series = lambda key: ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    axes[0].plot(*series("loss"), label="train")
    axes[0].plot(*series("eval_loss"), "o-", label="eval")
    axes[0].set(title="loss", xlabel="step", yscale="log")
    for key, style in (("top1", "-"), ("eval_top1", "o-"), ("eval_top5", "s--")):
        axes[1].plot(*series(key), style, label=key)
    axes[1].set(title="accuracy", xlabel="step", ylim=(0, 1))
    axes[2].plot(*series("lr"))
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    out, tmp = workdir / "curves.png", workdir / ".curves.tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    return out
