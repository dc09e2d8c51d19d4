"""Distillation's teacher targets, computed once: per training position the teacher's top-k
log-probabilities at the distillation temperature and the log of the mass left over (the tail).

Why: on a CPU the teacher's forward is about a third of a distillation step (teacher forward +
student forward and backward), and a run longer than its data trains on every row again each
epoch; with the targets kept, every row meets the teacher once. The loss (`topk_kl`) is the KL
between the teacher's and the student's distributions over k+1 outcomes (the k tokens, "any
other"): it equals the full KL when the teacher's tail is one token and is a lower bound of it
otherwise; tests/export/test_distill_targets.py checks its gradient against the full KL's.

Where they are kept: `cache_root()/distill-targets/<key>.npz`, key = the teacher's content, the
training rows' ids, k, the temperature and the vocabulary map, so reruns of a distill stage
(a resume, a sweep's variants with the same data) never run the teacher on those rows again.
Rows are filled the first time they are trained on and written with each checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.cache import cache_root, stable_key

log = logging.getLogger(__name__)
FOLDER = "distill-targets"
LOG_FLOOR = -30.0  # log of the smallest tail mass kept: exp(-30) ~ 1e-13, below fp32 noise here


def log1mexp(x: Any) -> Any:
    """log(1 - exp(x)) for x <= 0, floored at LOG_FLOOR (the tail of a distribution whose top-k
    holds all its mass in floating point)."""
    import torch

    return torch.log(-torch.expm1(x.clamp(max=-1e-7))).clamp(min=LOG_FLOOR)


def teacher_topk(logits: Any, k: int, temperature: float) -> tuple[Any, Any, Any]:
    """(ids [.., k], log-probs [.., k], tail log-mass [..]) of logits [.., V] at `temperature`."""
    import torch

    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = lp.topk(k, dim=-1)
    return top.indices, top.values, log1mexp(torch.logsumexp(top.values, dim=-1))


def topk_kl(student_logits: Any, ids: Any, t_lp: Any, t_tail: Any, temperature: float) -> Any:
    """Mean over positions of KL(teacher ‖ student) over the k teacher tokens + the tail bucket."""
    import torch

    s_lp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s_lp.gather(-1, ids)
    s_tail = log1mexp(torch.logsumexp(s_top, dim=-1))
    kl = (t_lp.exp() * (t_lp - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    return kl.mean()


class Targets:
    """The teacher's top-k targets for the rows of `data` [N, S], filled on demand by `fill`
    (teacher logits for a batch of rows) and kept in `path` (None: in memory only)."""

    def __init__(self, data: np.ndarray, k: int, temperature: float, path: Path | None) -> None:
        n, s = data.shape
        self.k, self.temperature, self.path = k, temperature, path
        self.ids = np.zeros((n, s, k), dtype=np.int32)
        self.lp = np.zeros((n, s, k), dtype=np.float32)
        self.tail = np.zeros((n, s), dtype=np.float32)
        self.done = np.zeros(n, dtype=bool)
        self.teacher_rows = 0  # rows the teacher ran on in this process
        self.dirty = False
        if path is not None and path.is_file():
            with np.load(path) as f:
                if f["ids"].shape == self.ids.shape:
                    self.ids, self.lp, self.tail, self.done = f["ids"], f["lp"], f["tail"], f["done"]
                else:  # a key collision is all but impossible; recompute rather than trust it
                    log.warning("distill: %s does not fit these rows; the teacher runs again", path)
            log.info("distill: %d of %d rows' teacher targets cached in %s", self.done.sum(), n, path)

    def get(self, rows: np.ndarray, ids: Any, teacher: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
        """The targets of `rows` (their ids: `ids`, a tensor) as tensors on ids' device; the
        teacher (ids -> logits) runs on the rows not seen before."""
        import torch

        missing = ~self.done[rows]
        if missing.any():
            with torch.no_grad():
                i, lp, tail = teacher_topk(teacher(ids[torch.from_numpy(missing)]), self.k, self.temperature)
            new = rows[missing]
            self.ids[new], self.lp[new] = i.cpu().numpy(), lp.cpu().numpy()
            self.tail[new] = tail.cpu().numpy()
            self.done[new] = True
            self.teacher_rows += int(missing.sum())
            self.dirty = True
        dev = ids.device
        return (
            torch.from_numpy(self.ids[rows]).long().to(dev),
            torch.from_numpy(self.lp[rows]).to(dev),
            torch.from_numpy(self.tail[rows]).to(dev),
        )

    def save(self) -> None:
        """Write what is filled (atomically) when anything new is."""
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, ids=self.ids, lp=self.lp, tail=self.tail, done=self.done)
        os.replace(tmp, self.path)
        self.dirty = False


def targets_path(teacher_digest: str, data: np.ndarray, k: int, temperature: float, vmap: Any) -> Path:
    """Where the targets of these rows from this teacher are kept (export cache)."""
    rows = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
    vocab = None if vmap is None else hashlib.sha256(np.ascontiguousarray(vmap).tobytes()).hexdigest()
    return cache_root() / FOLDER / f"{stable_key(teacher_digest, rows, k, temperature, vocab)}.npz"
