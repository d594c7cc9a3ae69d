"""The DPO training loop.

Launch (see README): `dpo-dist train --config cfg.yaml` (one process), or
`accelerate launch --config_file launch/accelerate/zero2.yaml -m dpo_dist train --config cfg.yaml`,
or `torchrun --nproc_per_node N -m dpo_dist train --config cfg.yaml distributed.deepspeed=ds_configs/zero2.json`.

Order of work: tokenize → reference log-probs (from the cache, or a reference pass that frees the
reference before the policy exists) → policy + optimizer, prepared by accelerate (DeepSpeed ZeRO when
configured) → resume → loop of optimizer steps → final export.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpo_dist import collectives, distributed, fingerprint
from dpo_dist.config import Config, LossConfig
from dpo_dist.data import PreferenceData
from dpo_dist.data.batching import MicroBatch, StepPlan, collate, eval_batches, rank_share
from dpo_dist.errors import Preempted, RunStopped, set_stage
from dpo_dist.model.logprobs import SequenceScores, sequence_logps
from dpo_dist.model.loading import policy_path
from dpo_dist.reference.cache import RefLogps, model_digests, run_fingerprint
from dpo_dist.reference.precompute import prepare_reference
from dpo_dist.session import setup_run
from dpo_dist.training import checkpoint, reshard
from dpo_dist.training.losses import LossOutput, PairScores, couples_pairs, preference_loss
from dpo_dist.training.metrics import MetricsLogger, MetricSums


def score_batch(model, batch: MicroBatch, ref, loss_cfg: LossConfig, sft_scale: float | None = None) -> LossOutput:
    """Policy log-probs of one micro-batch, its reference log-probs (cache or resident), and the loss."""
    policy = sequence_logps(model, batch, wpo=loss_cfg.use_weighting)
    return preference_loss(PairScores(policy, ref.for_batch(batch)), loss_cfg, sft_scale)


def pair_tokens(batch: MicroBatch) -> torch.Tensor:
    """Tokens of the pairs that count (weight > 0), prompt and both responses."""
    b = batch.num_pairs
    return ((batch.seq_lengths[:b] + batch.seq_lengths[b:]) * (batch.weight > 0)).sum()


@torch.no_grad()
def evaluate_policy(model, data: PreferenceData, ref: RefLogps, cfg: Config, accelerator, pad_id: int) -> dict:
    """Preference metrics of `model` over all of `data`, split across ranks, as `eval/...` keys."""
    was_training = model.training
    model.eval()
    topology = distributed.topology(cfg, accelerator)
    sums = MetricSums(accelerator.device, counted=topology.counts)
    for positions, weights in eval_batches(len(data.pairs), cfg.train.eval_batch_size,
                                           topology.data_parallel, topology.data_rank):
        batch = collate([data.pairs[p] for p in positions], pad_id, weights, shard=topology.shard,
                        **cfg.batch_layout).to(accelerator.device)
        out = score_batch(model, batch, ref, cfg.loss)
        sums.add(out, batch.weight, pair_tokens(batch))
    model.train(was_training)
    values = sums.reduce(accelerator)
    return {f"eval/{k}": v for k, v in values.items() if k != "tokens"}


def run_identity(cfg: Config, parts: dict[str, str], global_batch: int, policy: str) -> dict:
    """What a step count means: the data order (seed, global batch, the training pairs), the
    reference the rewards are measured against and the policy's starting weights (`policy`: their
    digest), which the checkpoint's shards continue. A checkpoint records it; resuming compares."""
    data = {key: parts[key] for key in ("train data files", "tokenizer")}
    data["settings"] = json.dumps({"max_length": cfg.data.max_length, "truncation": cfg.data.truncation,
                                   "columns": cfg.data.columns, "template": cfg.data.chat_template_kwargs},
                                  sort_keys=True)
    return {"train.seed": cfg.train.seed, "global batch": global_batch, "train data": fingerprint.combined(data),
            "reference": fingerprint.combined({key: parts[key] for key in ("reference weights", "reference config")}),
            "model.policy": policy}


def _rows_of(out: LossOutput, rows: torch.Tensor) -> LossOutput:
    return LossOutput(*(value.detach()[rows] for value in vars(out).values()))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.accelerator, self.tokenizer, self.splits = setup_run(cfg)
        acc = self.accelerator
        self.pad_id = self.tokenizer.pad_token_id
        parts = run_fingerprint(cfg, acc, self.splits, self.tokenizer)
        self.topology = distributed.topology(cfg, acc)  # (commands.load_run_config refused what it cannot run)
        dp = self.topology.data_parallel
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * dp
        self.plan = StepPlan(len(self.splits["train"].pairs), self.global_batch, cfg.train.seed)
        self.total_steps = (
            cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * self.plan.steps_per_epoch
        )
        self.layout = distributed.layout(cfg, acc)
        checkpoint.claim_root(acc, self.output_dir)
        resume_from = checkpoint.resolve_resume(cfg.resume, self.output_dir, say=acc.print)
        policy = collectives.on_main_broadcast(
            acc, lambda: fingerprint.combined(dict(zip(("weights", "config"), model_digests(policy_path(cfg.model))))))
        self.run_identity = run_identity(cfg, parts, self.global_batch, policy)
        if resume_from is not None:
            checkpoint.check_resumable(resume_from, self.run_identity, cfg.train.allow_resume_changes)
            if checkpoint.layout_change(resume_from, self.layout) and self.layout["deepspeed"]:
                reshard.load_universal_at_prepare(acc)
        checkpoint.check_exports_replaceable(acc, self.output_dir)  # now, not after the training
        # After the checks above, which need no reference log-probs: a refusal costs no reference pass.
        self.ref = {k: v.to(acc.device)
                    for k, v in prepare_reference(cfg, acc, self.splits, self.tokenizer, parts).items()}
        self.model, self.optimizer, self.scheduler = distributed.prepare_policy(cfg, acc, self.total_steps)
        self.step = 0
        self.logger = MetricsLogger(cfg, acc)
        self.preemption = distributed.PreemptionWatch(acc)
        self.best = None  # what OUTPUT_DIR/best/ holds for this run (train.save_best)
        self.nonfinite_in_row = self.nonfinite_skipped = 0
        if resume_from is not None:
            self.step = checkpoint.load(acc, resume_from, self.layout, self.model, self.optimizer, self.scheduler)
            self.best = checkpoint.best_so_far(self.output_dir)
            self.logger.forget_after(self.step)  # lines of steps after the checkpoint are logged anew
            acc.print(f"resumed from {resume_from} at step {self.step}")
        cut = "" if self.topology.sequence is None else f", each sequence cut across {self.topology.sequence.size}"
        acc.print(
            f"{acc.num_processes} process(es){cut}, global batch {self.global_batch} pairs "
            f"(micro {cfg.train.micro_batch_size} x accum {cfg.train.grad_accum} x {dp}), {self.total_steps} steps"
        )

    def train_step(self, positions: list[int], sums: MetricSums) -> tuple[float | None, bool, bool]:
        """One optimizer step over the global batch `positions`; returns the gradient norm, whether
        loss and gradient norm were finite (if not, no optimizer step was taken: DeepSpeed skips one
        whose gradient norm is not finite, and so does this loop otherwise), and whether any rank
        was signalled to stop (one all-reduce carries both flags)."""
        acc, cfg = self.accelerator, self.cfg
        train = self.splits["train"]
        topology = self.topology
        shares = rank_share(positions, topology.data_parallel, topology.data_rank, cfg.train.grad_accum)
        batches = [collate([train.pairs[p] for p in micro_positions], self.pad_id, weights, shard=topology.shard,
                           **cfg.batch_layout) for micro_positions, weights in shares]
        # Each rank's backward gets d(mean loss over the step's pairs) · world · accum: after
        # DeepSpeed/DDP divide by accum and average over ranks, the gradient is that of the mean
        # loss over all pairs of the step, also when the last step of an epoch is short. (Ranks that
        # share sequences each hold their columns' part of the gradient; the average over all ranks
        # adds the parts.)
        scale = acc.num_processes * cfg.train.grad_accum
        if couples_pairs(cfg.loss):
            objectives = self._coupled_objectives(positions, batches, sums)
        else:
            objectives = self._pairwise_objectives(positions, batches, sums)
        grad_norm, finite, preempted = None, True, False
        nonfinite = torch.zeros(1, device=acc.device)
        for batch, objective in zip(batches, objectives):
            with acc.accumulate(self.model):
                loss = objective(batch.to(acc.device)) * scale
                nonfinite += (~torch.isfinite(loss.detach())).float()
                distributed.backward(acc, self.model, loss)
                if acc.sync_gradients:
                    grad_norm = distributed.clip_gradients(acc, self.model, cfg.train.max_grad_norm or float("inf"))
                    flags = torch.cat([nonfinite, nonfinite.new_tensor([float(self.preemption.signalled)])])
                    flags = acc.reduce(flags, reduction="sum") if acc.num_processes > 1 else flags
                    nonfinite_count, signalled = flags.tolist()
                    finite = nonfinite_count == 0 and (grad_norm is None or math.isfinite(grad_norm))
                    preempted = signalled > 0
                if finite:
                    self.optimizer.step()
                self.optimizer.zero_grad()
        return grad_norm, finite, preempted

    def handle_nonfinite(self, positions: list[int]) -> None:
        """train.on_nonfinite: stop here (nothing of this step is saved), or count a skipped step
        and stop after train.max_nonfinite_skips of them in a row."""
        cfg = self.cfg.train
        self.nonfinite_in_row += 1
        self.nonfinite_skipped += 1
        pairs = sorted(int(self.splits["train"].pairs[p].index) for p in positions)
        where = f"non-finite loss or gradient norm at step {self.step + 1} (training pairs {pairs})"
        kept = self.kept()
        if cfg.on_nonfinite == "stop":
            raise RunStopped(f"{where}; stopped without an optimizer step or a save ({kept}); "
                             "train.on_nonfinite=skip skips such steps")
        if self.nonfinite_in_row > cfg.max_nonfinite_skips:
            raise RunStopped(f"{where}: {self.nonfinite_in_row} in a row, more than train.max_nonfinite_skips="
                             f"{cfg.max_nonfinite_skips}; stopped without a save ({kept})")
        self.accelerator.print(f"{where}: optimizer step skipped ({self.nonfinite_in_row} in a row)")

    def _pairwise_objectives(self, positions: list[int], batches: list[MicroBatch], sums: MetricSums):
        """Losses of one pair at a time: each micro-batch's part of the step's mean loss. The SFT
        term's token mean is over the whole step, whose token count the data already tells."""
        train, cfg = self.splits["train"], self.cfg
        sft_scale = len(positions) / max(sum(train.pairs[p].chosen.scored_tokens for p in positions), 1)

        def objective(batch: MicroBatch) -> torch.Tensor:
            out = score_batch(self.model, batch, self.ref["train"], cfg.loss, sft_scale)
            sums.add(out, batch.weight, pair_tokens(batch))
            return (out.losses * batch.weight).sum() / len(positions)

        return [objective] * len(batches)

    def _coupled_objectives(self, positions: list[int], batches: list[MicroBatch], sums: MetricSums):
        """Losses that look across the step's pairs (aot sorts them) on the global batch, whatever
        the process count and micro-batching: a no-grad forward of every micro-batch gives each
        pair's scores; gathered from all ranks, the step's loss is computed once, and its gradient
        with respect to each pair's policy log-probs becomes the weights of a linear objective that
        the micro-batches' forward-with-grad passes back through the model (exact, as the chain rule)."""
        acc, cfg = self.accelerator, self.cfg
        rows = []
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(acc.device)
                policy = sequence_logps(self.model, batch, wpo=cfg.loss.use_weighting)
                ref = self.ref["train"].for_batch(batch)
                wpo = policy.wpo if policy.wpo is not None else torch.zeros_like(policy.logps)
                # A row per pair: these six for the chosen response (0-5), for the rejected (6-11), weight.
                columns = [policy.logps, policy.shared_logps, policy.tokens.float(), wpo, ref.logps, ref.shared_logps]
                rows.append(torch.cat([torch.stack([c[: batch.num_pairs] for c in columns], 1),
                                       torch.stack([c[batch.num_pairs:] for c in columns], 1),
                                       batch.weight.to(acc.device)[:, None]], 1))
        local = torch.cat(rows)
        width = max(sum(len(part) for part, _ in rank_share(positions, acc.num_processes, r, cfg.train.grad_accum))
                    for r in range(acc.num_processes))
        padded = torch.cat([local, local.new_zeros(width - len(local), local.shape[1])])
        everyone = acc.gather(padded) if acc.num_processes > 1 else padded
        real = everyone[:, -1] > 0
        pairs = everyone[real]
        policy_logps = torch.cat([pairs[:, 0], pairs[:, 6]]).requires_grad_()
        policy_shared = torch.cat([pairs[:, 1], pairs[:, 7]]).requires_grad_()
        scores = PairScores(
            SequenceScores(policy_logps, torch.cat([pairs[:, 2], pairs[:, 8]]).long(), policy_shared,
                           torch.cat([pairs[:, 3], pairs[:, 9]])),
            SequenceScores(torch.cat([pairs[:, 4], pairs[:, 10]]), None, torch.cat([pairs[:, 5], pairs[:, 11]])),
        )
        out = preference_loss(scores, cfg.loss)
        total_grad, shared_grad = torch.autograd.grad(out.losses.mean(), [policy_logps, policy_shared],
                                                      allow_unused=True, materialize_grads=True)
        n = len(pairs)
        # Per pair of `everyone`: d(step loss)/d(log-prob), [rows, 4]: chosen, rejected, their shared parts.
        grads = everyone.new_zeros(len(everyone), 4)
        grads[real] = torch.stack([total_grad[:n], total_grad[n:], shared_grad[:n], shared_grad[n:]], 1)
        start = acc.process_index * width
        mine = grads[start : start + len(local)]
        in_step = torch.cumsum(real.long(), 0) - 1  # row of `everyone` -> its place among the step's pairs
        place = in_step[start : start + len(local)]
        kept = local[:, -1] > 0
        sums.add(_rows_of(out, place[kept]), local[kept, -1], sum(pair_tokens(b) for b in batches))

        offsets = torch.cumsum(torch.tensor([0] + [b.num_pairs for b in batches]), 0).tolist()

        def objective_for(k: int):
            def objective(batch: MicroBatch) -> torch.Tensor:
                policy = sequence_logps(self.model, batch)
                g = mine[offsets[k] : offsets[k + 1]]
                return ((torch.cat([g[:, 0], g[:, 1]]) * policy.logps).sum()
                        + (torch.cat([g[:, 2], g[:, 3]]) * policy.shared_logps).sum())
            return objective

        return [objective_for(k) for k in range(len(batches))]

    def keep_if_best(self, eval_values: dict) -> None:
        """Exports OUTPUT_DIR/best/ when `train.save_best`'s metric improves on what it holds."""
        key = self.cfg.train.save_best
        if key is None:
            return
        value, best = eval_values[key], self.best
        better = best is None or (value < best["value"] if self.cfg.train.save_best_mode == "min"
                                  else value > best["value"])
        if better:
            self.best = {"step": self.step, "metric": key, "value": value}
            checkpoint.export_final(self.accelerator, self.model, self.tokenizer, self.output_dir / "best",
                                    self.cfg, self.optimizer, self.best)
            self.accelerator.print(f"step {self.step}: best {key} so far ({value:.4f}); exported to "
                                   f"{self.output_dir / 'best'}")

    def evaluate(self) -> dict:
        return evaluate_policy(self.model, self.splits["eval"], self.ref["eval"], self.cfg, self.accelerator,
                               self.pad_id)

    def train(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        sums = MetricSums(acc.device, counted=self.topology.counts)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not acc.is_local_main_process)
        window_start = time.perf_counter()
        set_stage("training", self.kept)
        try:
            while self.step < self.total_steps:
                _, positions = self.plan.step_positions(self.step)
                lr = self.scheduler.get_last_lr()[0]
                before = sums.sums.clone()
                grad_norm, finite, preempted = self.train_step(positions, sums)
                if finite:
                    self.nonfinite_in_row = 0
                else:
                    self.handle_nonfinite(positions)
                    sums.sums.copy_(before)  # the skipped step's pairs stay out of the metrics
                    grad_norm = None
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
                    if cfg.train.on_nonfinite == "skip":
                        values["nonfinite_skipped"] = self.nonfinite_skipped
                    self.logger.log(self.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracies']:.2f}")
                    window_start = time.perf_counter()
                if "eval" in self.splits and ((cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last):
                    eval_values = self.evaluate()
                    self.logger.log(self.step, {"epoch": self.step / self.plan.steps_per_epoch, **eval_values})
                    acc.print(f"step {self.step}: eval loss {eval_values['eval/loss']:.4f}, "
                              f"accuracy {eval_values['eval/rewards/accuracies']:.3f}")
                    self.keep_if_best(eval_values)
                if (cfg.train.save_every and self.step % cfg.train.save_every == 0) or last or preempted:
                    checkpoint.save(acc, self.output_dir, self.step, cfg.train.keep_last, cfg, self.run_identity,
                                    self.layout, self.model, self.optimizer)
                    window_start = time.perf_counter()  # saving is not training time
                if preempted and not last:
                    raise Preempted(f"preempted: checkpoint of step {self.step} saved; resume=auto continues")
        finally:
            bar.close()  # before any error line, which would otherwise follow the bar
        set_stage("the export of final/", self.kept)
        checkpoint.export_final(acc, self.model, self.tokenizer, self.output_dir / "final", cfg, self.optimizer)
        acc.print(f"final model written to {self.output_dir / 'final'}")
        best = self.best
        if best is not None:
            acc.print(f"best model ({best['metric']} {best['value']:.4f} at step {best['step']}) in "
                      f"{self.output_dir / 'best'}")

    def kept(self) -> str:
        """What an interruption leaves of this run, and how to go on."""
        previous = checkpoint.latest(self.output_dir, say=lambda _: None)
        if previous is None:
            return "no checkpoint yet (train.save_every); a rerun starts over"
        return f"checkpoints/latest is {previous.name}; rerun with resume=auto to continue from it"

    def close(self) -> None:
        self.accelerator.end_training()
