"""PromptMM-style distillation (Wei et al., WWW 2024): a light student from a trained teacher run.

The teacher is any finished run (stage 1 or stage 2, any backbone; FREEDOM is the strongest on
ml100k). Its final user and item vectors are computed once and frozen; their dot products are the
teacher's scores. The student is an ID-only BPR-MF or LightGCN with a small dimension (default
LightGCN, 1 layer, 32-d, as PromptMM's `Student_LightGCN`), so that the serving index holds d
floats per item instead of the teacher's 64 and scoring needs no content features.

Student loss per batch of (user, positive, negative) triples, scores scaled by 1/temperature:
- the student's own loss (BPR + its regulariser), weight `bpr_weight`;
- `pair_weight` x KD_pair: KL between the teacher's and the student's Bernoulli preference
  sigma(s(u, pos) - s(u, neg)) (PromptMM feeds -log sigma into KLDivLoss; this is the clean form);
- `list_weight` x KD_list x temperature^2: per triple, the positive plus `list_negatives` items drawn
  uniformly from the training items; KL(softmax teacher || softmax student) over that list.
  PromptMM distils image-only and text-only teacher lists; a teacher here is one fused model, so
  its one list is distilled.
The KD weights default to 0.1 (PromptMM scales its KD terms by 1e6 against its own loss scale):
chosen on validation on ml100k (docs/results.md, "Distillation"); at 1 the student copies the
teacher's errors along with its ranking.
PromptMM's feature term (SCE between teacher modal item embeddings and the student's) is left out:
the student is ID-only and its dimension differs from the teacher's.

`init: svd` starts the student's ego embeddings from the best rank-d approximation of the teacher's
score matrix U_t I_t^T (QR of both factors, SVD of the small core): exact for a BPR-MF student with
d >= the teacher's rank, an approximation for LightGCN, whose final vectors are propagated.
PromptMM initialises its student from the teacher's final embeddings (same dimension there).

The run trains through stage 1's own loop (`run_stage1` with the backbone wrapped), so early
stopping, test-at-best-valid, resume, content heads (fitted to the student's space, for cold
start), head calibration and the cold-start split all behave as in stage 1 with the teacher's
config and seed. The output is a plain stage-1 run directory (config.yaml with the student as
backbone, best.pt, metrics.json with a "distill" section): `python -m export --run OUT` exports it.

`python -m train.distill --teacher RUN [--config DISTILL.yaml] [--set a.b=c] --out RUN_DIR`
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import Field

from train import checkpoint, distributed
from train.backbones import Backbone
from train.backbones.base import BackboneInputs
from train.backbones.bpr import BPRConfig
from train.backbones.lightgcn import LightGCNConfig
from train.cli import EXIT_CONFIG, load_or_report, parser, setup_logging
from train.config import EvalConfig, OptimConfig, Strict, TrainConfig, load_raw
from train.data import DatasetError
from train.run import BEST, DISTILL, load_run, run_device, write_metrics
from train.sampling import Batch
from train.stage1 import metrics_table, run_stage1

log = logging.getLogger(__name__)
StudentConfig = Annotated[BPRConfig | LightGCNConfig, Field(discriminator="name")]
STUDENT_PREFIX = "backbone.student."


class DistillConfig(Strict):
    """The student and its distillation loss; unset optim / eval take the teacher run's."""

    student: StudentConfig = Field(
        default_factory=lambda: LightGCNConfig(embedding_size=32, n_layers=1))
    init: Literal["svd", "random"] = "svd"
    bpr_weight: float = Field(1.0, ge=0.0)
    pair_weight: float = Field(0.1, ge=0.0)
    list_weight: float = Field(0.1, ge=0.0)
    list_negatives: int = Field(10, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    optim: OptimConfig | None = None
    eval: EvalConfig | None = None


def low_rank_factors(users: torch.Tensor, items: torch.Tensor, d: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U', I') of width d with U' I'^T the best rank-d approximation of users @ items^T (in the
    Frobenius norm), split evenly (singular values' square roots on both sides). Columns beyond the
    teacher's rank are zero."""
    u64, i64 = users.double(), items.double()
    qu, ru = torch.linalg.qr(u64)                  # (U, D), (D, D)
    qi, ri = torch.linalg.qr(i64)
    a, s, bh = torch.linalg.svd(ru @ ri.T)         # core (D, D)
    k = min(d, len(s))
    root = s[:k].sqrt()
    fu = torch.zeros(len(users), d, dtype=torch.float64)
    fi = torch.zeros(len(items), d, dtype=torch.float64)
    fu[:, :k] = qu @ a[:, :k] * root
    fi[:, :k] = qi @ bh[:k].T * root
    return fu.to(users.dtype), fi.to(items.dtype)


def relative_error(users: torch.Tensor, items: torch.Tensor, fu: torch.Tensor, fi: torch.Tensor
                   ) -> float:
    """||U I^T - Fu Fi^T||_F / ||U I^T||_F from Gram matrices, never forming a users x items
    matrix (||X Y^T||_F^2 = trace((X^T X)(Y^T Y)), <U I^T, Fu Fi^T> = trace((U^T Fu)(Fi^T I)))."""
    u, i, a, b = (t.double() for t in (users, items, fu, fi))
    teacher = torch.trace((u.T @ u) @ (i.T @ i))
    student = torch.trace((a.T @ a) @ (b.T @ b))
    cross = torch.trace((u.T @ a) @ (b.T @ i))
    return float((teacher + student - 2 * cross).clamp(min=0).sqrt() / teacher.sqrt())


def pair_kd(student_margin: torch.Tensor, teacher_margin: torch.Tensor) -> torch.Tensor:
    """Mean KL(Bernoulli(sigma(teacher)) || Bernoulli(sigma(student))) over the batch; 0 when the
    margins agree."""
    t_pos, t_neg = F.logsigmoid(teacher_margin), F.logsigmoid(-teacher_margin)
    s_pos, s_neg = F.logsigmoid(student_margin), F.logsigmoid(-student_margin)
    p = t_pos.exp()
    return (p * (t_pos - s_pos) + (1 - p) * (t_neg - s_neg)).mean()


def list_kd(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) over each row's candidate list, batch mean."""
    return F.kl_div(torch.log_softmax(student_scores, dim=1),
                    torch.log_softmax(teacher_scores, dim=1), log_target=True,
                    reduction="batchmean")


class Distilled(Backbone):
    """A student backbone trained on its own loss plus KD from frozen teacher vectors. Ranking uses
    the student alone; the teacher vectors are non-persistent buffers (never in a checkpoint)."""

    def __init__(self, student: Backbone, teacher_users: torch.Tensor, teacher_items: torch.Tensor,
                 pool: torch.Tensor, cfg: DistillConfig):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.register_buffer("t_users", teacher_users.detach().clone(), persistent=False)
        self.register_buffer("t_items", teacher_items.detach().clone(), persistent=False)
        self.register_buffer("pool", pool, persistent=False)

    @property
    def dim(self) -> int:
        return self.student.dim

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.embeddings()

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.id_embeddings()

    def on_epoch_start(self, generator: torch.Generator) -> None:
        self.student.on_epoch_start(generator)

    def kd_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(KD_pair, KD_list) of a batch; the list negatives come from torch's global RNG, which
        the training loop seeds and checkpoints."""
        tau = self.cfg.temperature
        users, items = self.student.embeddings()
        u, tu = users[batch.users], self.t_users[batch.users]               # (B, d), (B, D)
        neg = self.pool[torch.randint(len(self.pool), (len(batch.users), self.cfg.list_negatives),
                                      device=self.pool.device)]
        cand = torch.cat([batch.pos[:, None], neg], dim=1)                   # (B, 1 + N)
        s = torch.einsum("bd,bnd->bn", u, items[cand]) / tau
        t = torch.einsum("bd,bnd->bn", tu, self.t_items[cand]) / tau
        s_margin = ((u * (items[batch.pos] - items[batch.neg])).sum(1)) / tau
        t_margin = ((tu * (self.t_items[batch.pos] - self.t_items[batch.neg])).sum(1)) / tau
        return pair_kd(s_margin, t_margin), list_kd(s, t) * tau ** 2

    def loss(self, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        loss = cfg.bpr_weight * self.student.loss(batch)
        if cfg.pair_weight or cfg.list_weight:
            pair, listwise = self.kd_losses(batch)
            loss = loss + cfg.pair_weight * pair + cfg.list_weight * listwise
        return loss


def student_config(teacher: TrainConfig, dcfg: DistillConfig) -> TrainConfig:
    """The teacher's run config with the student as backbone (same data, seed, splits, heads).
    Without content heads the student needs no encoders: its run is ID-only."""
    update = {"backbone": dcfg.student, "optim": dcfg.optim or teacher.optim,
              "eval": dcfg.eval or teacher.eval}
    if teacher.heads is None:
        update["encoders"] = None
    return TrainConfig.model_validate(teacher.model_copy(update=update).model_dump())


def unwrap_checkpoint(path: Path) -> None:
    """Rename the wrapper's `backbone.student.*` keys to `backbone.*` (atomically), so that the
    run loads as a plain run of the student backbone."""
    state = checkpoint.load(path)
    if not any(k.startswith(STUDENT_PREFIX) for k in state):
        return
    renamed = {("backbone." + k[len(STUDENT_PREFIX):] if k.startswith(STUDENT_PREFIX) else k): v
               for k, v in state.items()}
    checkpoint.save_atomic(renamed, path)


def run_distill(teacher_dir: Path, dcfg: DistillConfig, out: Path, device: torch.device,
                resume: bool = False) -> dict:
    """Distil the teacher run into a student run at `out`; returns the student's metrics."""
    if not (teacher_dir / BEST).is_file():
        raise FileNotFoundError(f"{teacher_dir}: no {BEST}; is it a finished training run?")
    teacher = load_run(teacher_dir, device)
    with torch.no_grad():
        t_users, t_items = (t.detach().float() for t in teacher.model.embeddings())
    t_cfg, t_metrics = teacher.cfg, teacher.metrics
    del teacher  # its backbone, heads and towers need not stay in (GPU) memory meanwhile
    cfg = student_config(t_cfg, dcfg)
    report: dict = {}

    def wrap(student: Backbone, inputs: BackboneInputs) -> Backbone:
        if (inputs.n_users, inputs.n_items) != (len(t_users), len(t_items)):
            raise ValueError(f"teacher {teacher_dir} has {len(t_users)} users x {len(t_items)} "
                             f"items, the student's data {inputs.n_users} x {inputs.n_items}")
        if dcfg.init == "svd":
            ego = student.id_embeddings()
            if not all(isinstance(e, torch.nn.Parameter) for e in ego):
                raise TypeError(f"{type(student).__name__}: id_embeddings are not parameters")
            fu, fi = low_rank_factors(t_users.cpu(), t_items.cpu(), ego[0].shape[1])
            with torch.no_grad():
                ego[0].copy_(fu)
                ego[1].copy_(fi)
            report["svd_relative_error"] = relative_error(t_users.cpu(), t_items.cpu(), fu, fi)
        pool = torch.unique(inputs.train_items).to(device)
        return Distilled(student, t_users.to(device), t_items.to(device), pool, dcfg)

    start = time.perf_counter()
    metrics = run_stage1(cfg, out, device, resume, wrap=wrap)
    if not distributed.is_main():  # under torchrun rank 0 alone writes the run directory
        return metrics
    unwrap_checkpoint(out / BEST)
    d_student = dcfg.student.embedding_size
    d_teacher = t_items.shape[1]
    metrics["distill"] = report | {
        "teacher": str(teacher_dir), "teacher_backbone": t_cfg.backbone.name,
        "teacher_test": t_metrics.get("test", {}),
        "teacher_valid": t_metrics.get("valid", {}),
        "teacher_dim": d_teacher, "student_dim": d_student,
        "item_vector_bytes": {"teacher": 4 * d_teacher, "student": 4 * d_student},
        "config": dcfg.model_dump(mode="json"), "wall_seconds": time.perf_counter() - start}
    (out / DISTILL).write_text(yaml.safe_dump(dcfg.model_dump(mode="json"), sort_keys=False),
                               encoding="utf-8")
    write_metrics(out, metrics)
    return metrics


def load_distill_config(path: Path | None, overrides: list[str]) -> DistillConfig:
    """Read the distillation YAML (optional) and apply `a.b=c` overrides."""
    return DistillConfig.model_validate(load_raw(path, overrides))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    setup_logging()
    p = parser("python -m train.distill", __doc__, config_required=False,
               config_help="distillation YAML (default: LightGCN 1 layer 32-d)")
    p.add_argument("--teacher", type=Path, required=True, help="finished teacher run directory")
    p.add_argument("--out", type=Path, required=True, help="student run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    dcfg = load_or_report(load_distill_config, args.config, args.overrides,
                          "distillation config")
    if dcfg is None:
        return EXIT_CONFIG
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.init(run_device(args.teacher))
    main_rank = distributed.is_main()
    try:
        metrics = run_distill(args.teacher, dcfg, args.out, device, args.resume)
    except (FileNotFoundError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        distributed.shutdown()
    if not main_rank:
        return 0
    info = metrics["distill"]
    teacher = {"test": info["teacher_test"], "valid": info["teacher_valid"]}
    print(f"\nteacher {info['teacher_backbone']} ({info['teacher_dim']}-d), {args.teacher}:\n"
          + metrics_table(teacher))
    print(f"\nstudent {dcfg.student.name} ({info['student_dim']}-d), {args.out}:\n"
          + metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
