"""The DPO training loop.

Launch (see README): `dpo-dist train --config cfg.yaml` (one process), or
`accelerate launch --config_file launch/accelerate/zero2.yaml -m dpo_dist train --config cfg.yaml`,
or `torchrun --nproc_per_node N -m dpo_dist train --config cfg.yaml distributed.deepspeed=ds_configs/zero2.json`.

Order of work: tokenize → reference log-probs (from the cache, or a reference pass that frees the
reference before the policy exists) → policy + optimizer, prepared by accelerate (DeepSpeed ZeRO when
configured) → resume → loop of optimizer steps → final export.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpo_dist import checkpoint, distributed, models
from dpo_dist.batching import MicroBatch, StepPlan, collate, eval_batches, rank_share
from dpo_dist.config import Config, LossConfig, save_config
from dpo_dist.data import PreferenceData, prepare_split
from dpo_dist.errors import Preempted
from dpo_dist.logprobs import sequence_logps
from dpo_dist.losses import LossOutput, PairScores, preference_loss
from dpo_dist.metrics import MetricsLogger, MetricSums
from dpo_dist.ref_cache import RefLogps, prepare_reference


def load_splits(cfg: Config, tokenizer, accelerator) -> dict[str, PreferenceData]:
    """The train (and eval) pairs from the token cache, which the ranks build together when needed."""
    splits = {"train": prepare_split(cfg, accelerator, "train", cfg.data.train, tokenizer)}
    if cfg.data.eval:
        splits["eval"] = prepare_split(cfg, accelerator, "eval", cfg.data.eval, tokenizer)
    for name, data in splits.items():
        accelerator.print(data.summary(name))
    return splits


def setup_run(cfg: Config):
    """What every command starts with: the accelerator, the resolved config on disk, the
    tokenizer and the tokenized splits. Returns (accelerator, tokenizer, splits)."""
    accelerator = distributed.build_accelerator(cfg)
    distributed.seed_everything(cfg.train.seed)
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    tokenizer = models.load_tokenizer(cfg.model)
    if cfg.train.prefix_sharing and not cfg.share_prefix:
        accelerator.print(f"train.prefix_sharing: not with packing={cfg.packing_mode} (the attention kernel cannot "
                          "take the shared-prompt mask); sequences are packed unshared")
    return accelerator, tokenizer, load_splits(cfg, tokenizer, accelerator)


def score_batch(model, batch: MicroBatch, ref: RefLogps, loss_cfg: LossConfig) -> tuple[LossOutput, PairScores]:
    """Policy log-probs of one micro-batch, its reference log-probs (cache or resident), and the loss."""
    logps, tokens = sequence_logps(model, batch)
    b = batch.num_pairs
    ref_chosen, ref_rejected = ref.for_batch(batch)
    scores = PairScores(logps[:b], logps[b:], ref_chosen, ref_rejected, tokens[:b], tokens[b:])
    out = preference_loss(
        scores,
        loss_type=loss_cfg.type,
        beta=loss_cfg.beta,
        label_smoothing=loss_cfg.label_smoothing,
        rpo_alpha=loss_cfg.rpo_alpha,
        reference_free=loss_cfg.reference_free,
    )
    return out, scores


def pair_tokens(batch: MicroBatch) -> torch.Tensor:
    """Tokens of the pairs that count (weight > 0), prompt and both responses."""
    b = batch.num_pairs
    return ((batch.seq_lengths[:b] + batch.seq_lengths[b:]) * (batch.weight > 0)).sum()


@torch.no_grad()
def evaluate_policy(model, data: PreferenceData, ref: RefLogps, cfg: Config, accelerator, pad_id: int) -> dict:
    """Preference metrics of `model` over all of `data`, split across ranks, as `eval/...` keys."""
    was_training = model.training
    model.eval()
    sums = MetricSums(accelerator.device)
    for positions, weights in eval_batches(len(data.pairs), cfg.train.eval_batch_size,
                                           accelerator.num_processes, accelerator.process_index):
        batch = collate([data.pairs[p] for p in positions], pad_id, weights, cfg.packing_mode,
                        cfg.share_prefix).to(accelerator.device)
        out, scores = score_batch(model, batch, ref, cfg.loss)
        sums.add(out, scores, batch.weight, pair_tokens(batch))
    model.train(was_training)
    values = sums.reduce(accelerator)
    return {f"eval/{k}": v for k, v in values.items() if k != "tokens"}


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.accelerator, self.tokenizer, self.splits = setup_run(cfg)
        acc = self.accelerator
        self.pad_id = self.tokenizer.pad_token_id
        self.ref = {k: v.to(acc.device) for k, v in prepare_reference(cfg, acc, self.splits, self.tokenizer).items()}

        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * acc.num_processes
        self.plan = StepPlan(len(self.splits["train"].pairs), self.global_batch, cfg.train.seed)
        self.total_steps = (
            cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * self.plan.steps_per_epoch
        )
        self.model, self.optimizer, self.scheduler = distributed.prepare_policy(cfg, acc, self.total_steps)
        self.step = 0
        self.logger = MetricsLogger(self.output_dir, enabled=acc.is_main_process)
        self.preemption = distributed.PreemptionWatch(acc)
        resume_from = checkpoint.resolve_resume(cfg.resume, self.output_dir)
        if resume_from is not None:
            self.step = checkpoint.load(acc, resume_from)["step"]
            acc.print(f"resumed from {resume_from} at step {self.step}")
        acc.print(
            f"{acc.num_processes} process(es), global batch {self.global_batch} pairs "
            f"(micro {cfg.train.micro_batch_size} x accum {cfg.train.grad_accum} x {acc.num_processes}), "
            f"{self.total_steps} steps"
        )

    def train_step(self, positions: list[int], sums: MetricSums) -> float | None:
        """One optimizer step over the global batch `positions`; returns the gradient norm."""
        acc, cfg = self.accelerator, self.cfg
        train = self.splits["train"]
        # Each rank's backward gets sum(loss) · world · accum / pairs-in-step: after DeepSpeed/DDP
        # divide by accum and average over ranks, the gradient is that of the mean loss over all
        # pairs of the step, also when the last step of an epoch is short.
        scale = acc.num_processes * cfg.train.grad_accum / len(positions)
        grad_norm = None
        for micro_positions, weights in rank_share(positions, acc.num_processes, acc.process_index,
                                                   cfg.train.grad_accum):
            batch = collate([train.pairs[p] for p in micro_positions], self.pad_id, weights,
                            cfg.packing_mode, cfg.share_prefix).to(acc.device)
            with acc.accumulate(self.model):
                out, scores = score_batch(self.model, batch, self.ref["train"], cfg.loss)
                acc.backward((out.losses * batch.weight).sum() * scale)
                if acc.sync_gradients:
                    max_norm = cfg.train.max_grad_norm or float("inf")
                    norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                    grad_norm = None if norm is None else float(norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            sums.add(out, scores, batch.weight, pair_tokens(batch))
        return grad_norm

    def evaluate(self) -> dict:
        return evaluate_policy(self.model, self.splits["eval"], self.ref["eval"], self.cfg, self.accelerator,
                               self.pad_id)

    def train(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        sums = MetricSums(acc.device)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not acc.is_local_main_process)
        window_start = time.perf_counter()
        while self.step < self.total_steps:
            _, positions = self.plan.step_positions(self.step)
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self.train_step(positions, sums)
            self.scheduler.step()
            self.step += 1
            bar.update(1)
            last = self.step == self.total_steps

            if self.step % cfg.train.log_every == 0 or last:
                values = sums.reduce(acc)
                elapsed = time.perf_counter() - window_start
                values.update(
                    epoch=self.step / self.plan.steps_per_epoch,
                    lr=lr,
                    grad_norm=grad_norm,
                    pairs_per_s=values["pairs"] / elapsed,
                    tokens_per_s=values.pop("tokens") / elapsed,
                )
                self.logger.log(self.step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracies']:.2f}")
                window_start = time.perf_counter()
            if "eval" in self.splits and ((cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last):
                eval_values = self.evaluate()
                self.logger.log(self.step, {"epoch": self.step / self.plan.steps_per_epoch, **eval_values})
                acc.print(f"step {self.step}: eval loss {eval_values['eval/loss']:.4f}, "
                          f"accuracy {eval_values['eval/rewards/accuracies']:.3f}")
            preempted = self.preemption.requested()
            if (cfg.train.save_every and self.step % cfg.train.save_every == 0) or last or preempted:
                checkpoint.save(acc, self.output_dir, self.step, cfg.train.keep_last, cfg)
                window_start = time.perf_counter()  # saving is not training time
            if preempted and not last:
                bar.close()
                raise Preempted(f"preempted: checkpoint of step {self.step} saved; resume=auto continues")
        bar.close()
        checkpoint.export_final(acc, self.model, self.tokenizer, self.output_dir / "final", cfg.model)
        acc.print(f"final model written to {self.output_dir / 'final'}")

    def close(self) -> None:
        self.logger.close()
        self.accelerator.end_training()
