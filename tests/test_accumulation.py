"""Gradient accumulation (trainer.accumulate_grad_batches = k): k micro-batches of B/k train as one
batch of B, the LR schedule counts optimizer steps, a skipped step undoes all k micro-batches, and the
head's state advances per micro-batch (FaceRecognitionModule's docstring says why).

The runs are the smoke run of the real configs, trained in this process so that callbacks can record
each micro-batch; no validation, no checkpoints.
"""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from conftest import TINY_RUN, compose_config, read_metrics
from facerec.config import instantiate_all
from facerec.backbones.weights import build_backbone
from facerec.training.fit import build_module

# The smoke run takes 8 images of each of its 20 classes: 160 images.
IMAGES = 160


def fit(run_dir, overrides: list[str], callbacks=(), freeze_batchnorm: bool = False):
    """A smoke run (logger=csv) as train.py builds it, plus `callbacks`; returns (module, trainer).
    freeze_batchnorm: every BatchNorm normalises with its fixed statistics (finetune.freeze on all of
    their parameters, finetune=partial), so a sample's embedding does not depend on the other samples of its batch."""
    options = [*TINY_RUN, "logger=csv", "+trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
               "+trainer.enable_progress_bar=false", *overrides]
    cfg = compose_config(options, run_dir)
    if freeze_batchnorm:
        backbone = build_backbone(cfg.model)
        batchnorms = [name for name, module in backbone.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
        cfg = compose_config([*options, "finetune=partial", f"finetune.freeze=[{','.join(batchnorms)}]"], run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    module = build_module(cfg)
    trainer = instantiate(
        cfg.trainer, callbacks=[instantiate(cfg.callbacks.lr_monitor), *callbacks], logger=instantiate_all(cfg.logger)
    )
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def head_buffers(module) -> dict[str, torch.Tensor]:
    return {name: buffer.detach().clone() for name, buffer in module.head.named_buffers()}


class RecordMicroBatches(L.Callback):
    """Per micro-batch: its optimizer step, labels, embeddings, class centres, loss and the head's
    buffers before and after it; per optimizer step: its learning rate."""

    def __init__(self):
        self.micro_batches: list[dict] = []
        self.learning_rates: list[tuple[int, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        def keep_embeddings(backbone, inputs, embeddings):
            self.micro_batches[-1]["embeddings"] = embeddings.detach().clone()

        pl_module.backbone.register_forward_hook(keep_embeddings)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.micro_batches.append(
            {"step": trainer.global_step, "labels": batch[1].clone(), "centres": pl_module.head.centres.weight.detach().clone(),
             "before": head_buffers(pl_module)}
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.learning_rates.append((trainer.global_step, optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back the loss it differentiated: the micro-batch's divided by k
        loss = outputs["loss"] * trainer.accumulate_grad_batches
        self.micro_batches[-1].update(after=head_buffers(pl_module), loss=loss.item())


class KeepInitialState(L.Callback):
    """The model's state dict as training starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.state = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}


def test_k_micro_batches_of_b_over_k_train_as_one_batch_of_b(tmp_path):
    """SGD with momentum and weight decay, warmup and cosine decay, CosFace at the auto scale (fixed),
    BatchNorm frozen: 2 micro-batches of 8 give the parameters 1 batch of 16 gives, in float32 up to
    the summation order. 120 images: the epoch's 15 micro-batches end in a step of 1, which must
    average it as the 16-batch run's last batch of 8 (not halve it)."""
    data = ["dataset.train.images_per_class=6", "+dataset.drop_last=false"]  # the same samples in the same order
    initial = KeepInitialState()
    one_batch, one_trainer = fit(tmp_path / "b16", [*data, "dataset.batch_size=16"], [initial], freeze_batchnorm=True)
    accumulated, trainer = fit(
        tmp_path / "b8x2", [*data, "dataset.batch_size=8", "trainer.accumulate_grad_batches=2"], freeze_batchnorm=True
    )
    assert trainer.num_training_batches == 15 and one_trainer.num_training_batches == 8
    assert trainer.global_step == one_trainer.global_step == 16
    expected = one_batch.state_dict()
    largest_change = max((expected[name] - value).abs().max().item() for name, value in initial.state.items() if value.is_floating_point())
    assert largest_change > 0.05  # the runs trained: a match is not two untouched models
    # float32 sums the 16 samples' gradients in another order than two means of 8 do: 4e-7 apart after 16 steps
    for name, value in accumulated.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "limits, optimizer_steps",
    [(["trainer.max_epochs=2"], 2 * IMAGES // 16), (["trainer.max_epochs=-1", "trainer.max_steps=7"], 7)],
    ids=["max_epochs", "max_steps"],
)
def test_the_lr_schedule_counts_optimizer_steps(tmp_path, limits, optimizer_steps):
    recorder = RecordMicroBatches()
    module, trainer = fit(tmp_path, ["dataset.batch_size=8", "trainer.accumulate_grad_batches=2", *limits], [recorder])
    assert len(recorder.micro_batches) == 2 * optimizer_steps
    schedule = trainer.lr_scheduler_configs[0].scheduler
    assert schedule.lr_lambdas[0].total_steps == optimizer_steps == trainer.global_step
    base_lr = schedule.base_lrs[0]
    expected = [base_lr * schedule.lr_lambdas[0](step) for step in range(optimizer_steps)]
    assert [step for step, _ in recorder.learning_rates] == list(range(optimizer_steps))
    assert [lr for _, lr in recorder.learning_rates] == pytest.approx(expected, rel=1e-12)
    assert expected[-1] < 0.1 * base_lr  # the run ends where the cosine does, not half-way down it
    # LearningRateMonitor logs before every micro-batch, against the optimizer step: one value per step
    logged: dict[int, set[float]] = {}
    for row in read_metrics(tmp_path):
        if row.get("train/lr"):
            logged.setdefault(int(row["step"]), set()).add(float(row["train/lr"]))
    assert sorted(logged) == list(range(optimizer_steps)) and all(len(values) == 1 for values in logged.values())
    assert [logged[step].pop() for step in range(optimizer_steps)] == pytest.approx(expected, rel=1e-6)


class NonFiniteMicroBatch(L.Callback):
    """NaN images in one micro-batch (`micro_batch` of the step's k) of optimizer step `step`; the
    model's state dict and the optimizer's state recorded before the step's first micro-batch and
    after the step."""

    def __init__(self, step: int, micro_batch: int):
        self.step, self.micro_batch = step, micro_batch
        self.before: dict | None = None
        self.after: dict | None = None

    @staticmethod
    def _state(trainer, pl_module) -> dict:
        model = {name: value.detach().clone() for name, value in pl_module.state_dict().items() if "nonfinite" not in name}
        momentum = [state["momentum_buffer"].clone() for state in trainer.optimizers[0].state.values()]
        return {"model": model, "momentum": momentum}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        position = batch_idx % trainer.accumulate_grad_batches
        if position == 0:
            self.before = self._state(trainer, pl_module)
        if position == self.micro_batch:
            batch[0].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1 and self.after is None:
            self.after = self._state(trainer, pl_module)


def test_a_skipped_step_restores_the_state_before_its_first_micro_batch(tmp_path):
    """NaN images in the first of a step's two micro-batches: its forward writes NaN into BatchNorm's
    running statistics and the second micro-batch's forward moves them, s and AdaFace's EMAs again;
    the skipped step must leave every parameter, buffer and momentum as before the first one."""
    fault = NonFiniteMicroBatch(step=3, micro_batch=0)
    overrides = ["head=adaface", "scale=dynamic", "scale.max_scale=100", "dataset.batch_size=8", "trainer.accumulate_grad_batches=2",
                 "trainer.max_epochs=1"]
    module, trainer = fit(tmp_path, overrides, [fault])
    assert int(module.step_guard.nonfinite_steps) == 1 and trainer.global_step == IMAGES // 16
    assert any("running_mean" in name for name in fault.before["model"]) and "head.scale.s" in fault.before["model"]
    assert {"head.margin.batch_mean", "head.margin.batch_std"} <= set(fault.before["model"])
    for name, before in fault.before["model"].items():
        assert torch.equal(before, fault.after["model"][name]), name
    assert len(fault.before["momentum"]) == len(list(module.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(fault.before["momentum"], fault.after["momentum"]))
    assert all(torch.isfinite(value).all() for value in module.state_dict().values() if value.is_floating_point())


def test_s_and_the_margin_emas_advance_per_micro_batch_and_log_once_per_step(tmp_path):
    """AdaFace with the dynamic scale, 2 micro-batches of 8 per step: each micro-batch moves AdaFace's
    norm EMAs and s from its own 8 samples (twice per optimizer step); the diagnostics are logged once
    per step, from its last micro-batch, and train/loss is the mean of the step's two losses."""
    recorder = RecordMicroBatches()
    overrides = ["head=adaface", "scale=dynamic", "scale.max_scale=100", "dataset.batch_size=8", "trainer.accumulate_grad_batches=2",
                 "trainer.max_epochs=-1", "trainer.max_steps=4"]
    module, trainer = fit(tmp_path, overrides, [recorder])
    rate, policy = module.head.margin.t_alpha, module.head.scale
    assert [record["step"] for record in recorder.micro_batches] == [0, 0, 1, 1, 2, 2, 3, 3]
    for record in recorder.micro_batches:
        before, after, embeddings, labels = record["before"], record["after"], record["embeddings"], record["labels"]
        norms = embeddings.norm(dim=1).clamp(0.001, 100)  # AdaFace's clipped norms of this micro-batch
        for name, statistic in [("margin.batch_mean", norms.mean()), ("margin.batch_std", norms.std())]:
            assert after[name].item() == pytest.approx((1 - rate) * before[name].item() + rate * statistic.item(), rel=1e-6)
        # Dynamic AdaCos on this micro-batch alone, at the s the previous micro-batch left
        cosine = F.normalize(embeddings.double(), dim=1) @ F.normalize(record["centres"].double(), dim=1).T
        target = cosine.gather(1, labels.view(-1, 1)).squeeze(1)
        others = (before["scale.s"].double() * cosine).scatter(1, labels.view(-1, 1), -math.inf)
        log_b_avg = torch.logsumexp(torch.logsumexp(others, dim=1), dim=0) - math.log(len(labels))
        theta_med = torch.acos(target).median()
        s = min(log_b_avg.item() / math.cos(min(policy.theta0, theta_med.item())), policy.s_max)
        assert after["scale.s"].item() == pytest.approx(s, rel=1e-5)
    assert len({record["after"]["scale.s"].item() for record in recorder.micro_batches}) == 8  # it moved at every micro-batch
    rows = [row for row in read_metrics(tmp_path) if row.get("train/loss")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    for row, first, last in zip(rows, recorder.micro_batches[0::2], recorder.micro_batches[1::2]):
        assert float(row["train/loss"]) == pytest.approx((first["loss"] + last["loss"]) / 2, rel=1e-6)
        assert float(row["train/s"]) == pytest.approx(last["after"]["scale.s"].item(), rel=1e-6)
        assert float(row["train/norm_mean"]) == pytest.approx(last["embeddings"].norm(dim=1).mean().item(), rel=1e-5)
