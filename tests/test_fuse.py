"""Fused trials (CPU): members train as they train alone, each pruned, diverging or resumed on its own."""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from test_processes import swallowed_interrupt

from fer_search.data import FerData, load_data
from fer_search.fuse import Member, fuse_key, train_fused
from fer_search.model import BASELINE, TrialParams
from fer_search.processes import Terminated, signals_interrupt
from fer_search.train import Checkpoint, DivergedError, EpochRecord, TrainResult, TrainSettings, train_model

CPU = torch.device("cpu")
SMALL = dataclasses.replace(BASELINE, batch_size=32, width=0.5)
# One architecture, three trials: every per-member field differs (rates, lr, decay, optimizer, scheduler).
MEMBERS = (
    SMALL,
    dataclasses.replace(
        SMALL, lr=7e-4, dropout_high=0.4, dropout_low=0.2, dropout_head=0.3, optimizer="adamw", scheduler="cosine"
    ),
    dataclasses.replace(SMALL, lr=4e-4, weight_decay=1e-3, dropout_high=0.6),
)
EPOCHS = 3
# The largest weight gap between a trial trained fused and alone (floating-point noise grown by training, see
# assert_same_training): about 2e-3 here, where two of these trials' weights lie about 2 apart.
WEIGHT_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def data(tiny_fer: Path, tmp_path_factory: pytest.TempPathFactory) -> FerData:
    return load_data(tiny_fer, tmp_path_factory.mktemp("cache"))


def pruned_at(epoch: int, seen: list[EpochRecord]) -> Callable[[EpochRecord, Callable[[], Checkpoint]], None]:
    """An epoch callback that records each epoch and prunes at `epoch`, as a trial's does."""

    def on_epoch(record: EpochRecord, _checkpoint: Callable[[], Checkpoint]) -> None:
        seen.append(record)
        if record.epoch == epoch:
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    return on_epoch


def assert_same_training(fused: list[EpochRecord], alone: list[EpochRecord], data: FerData) -> None:
    """Equal to floating-point tolerance. Grouped convolutions sum in another order than one model's, and training
    grows such last-bit differences: the same trial trained alone on 1 thread instead of 2 moves its losses by up
    to 4e-4 (relative) here, and flips an accuracy where two logits of a face lie within 1e-5 (the tiny model's
    faces do), so accuracies may differ by one image. A wrong mask, batch order, lr or schedule moves the losses
    by percents."""
    assert [r.epoch for r in fused] == [r.epoch for r in alone]
    for f, a in zip(fused, alone):
        assert (f.train_loss, f.val_loss, f.lr) == pytest.approx((a.train_loss, a.val_loss, a.lr), rel=1e-3)
        assert abs(f.train_acc - a.train_acc) <= 1.01 / len(data.train.x)
        assert abs(f.val_acc - a.val_acc) <= 1.01 / len(data.val.x)


def last_weights(result: TrainResult) -> dict[str, torch.Tensor]:
    """The weights after the last epoch (the best epoch's may differ where a near-tie flips an accuracy)."""
    return result.model.state_dict()


def max_weight_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_fused_members_train_as_they_do_alone_and_one_pruned_midway_leaves_the_others_alone(data: FerData) -> None:
    alone_seen: list[list[EpochRecord]] = [[], [], []]
    alone: list[TrainResult | Exception] = []
    for i, params in enumerate(MEMBERS):
        try:
            alone.append(
                train_model(
                    params, data, TrainSettings(EPOCHS, 10 + i, CPU), pruned_at(2 if i == 1 else 0, alone_seen[i])
                )
            )
        except optuna.TrialPruned as e:
            alone.append(e)

    fused_seen: list[list[EpochRecord]] = [[], [], []]
    members = [Member(p, 10 + i, pruned_at(2 if i == 1 else 0, fused_seen[i])) for i, p in enumerate(MEMBERS)]
    order = list(train_fused(members, data, EPOCHS, CPU))

    assert [i for i, _ in order] == [1, 0, 2]  # the pruned member is told as it ends, not with the others
    outcomes = dict(order)
    assert isinstance(outcomes[1], optuna.TrialPruned)
    assert_same_training(fused_seen[1], alone_seen[1], data)  # its two epochs, as alone
    for i in (0, 2):
        fused, solo = outcomes[i], alone[i]
        assert isinstance(fused, TrainResult) and isinstance(solo, TrainResult)
        assert_same_training(fused.history, solo.history, data)
        assert max_weight_gap(last_weights(fused), last_weights(solo)) < WEIGHT_TOLERANCE
    # The comparison can tell trainings apart: two members' weights differ by far more than the tolerance.
    first, third = outcomes[0], outcomes[2]
    assert isinstance(first, TrainResult) and isinstance(third, TrainResult)
    assert max_weight_gap(last_weights(first), last_weights(third)) > 100 * WEIGHT_TOLERANCE


def test_a_member_resumed_from_its_checkpoint_fuses_with_a_fresh_one(data: FerData) -> None:
    """A requeued trial (epoch 2 of 3) and a new one train fused; the resumed one ends as if never stopped."""
    params, seed = MEMBERS[1], 7
    saved: list[Checkpoint] = []

    def keep_first(record: EpochRecord, checkpoint: Callable[[], Checkpoint]) -> None:
        if record.epoch == 1:
            saved.append(Checkpoint.from_bytes(checkpoint().to_bytes()))
            raise KeyboardInterrupt  # the run stops here, as a Ctrl-C would

    with pytest.raises(KeyboardInterrupt):
        train_model(params, data, TrainSettings(EPOCHS, seed, CPU), keep_first)
    whole = train_model(params, data, TrainSettings(EPOCHS, seed, CPU))

    outcomes = dict(train_fused([Member(params, seed, resume=saved[0]), Member(MEMBERS[2], 8)], data, EPOCHS, CPU))
    resumed, fresh = outcomes[0], outcomes[1]
    assert isinstance(resumed, TrainResult) and isinstance(fresh, TrainResult)
    assert_same_training(resumed.history, whole.history, data)
    assert max_weight_gap(last_weights(resumed), last_weights(whole)) < WEIGHT_TOLERANCE
    assert len(fresh.history) == EPOCHS


def test_a_diverging_member_ends_alone(data: FerData) -> None:
    saved: list[Checkpoint] = []
    train_model(SMALL, data, TrainSettings(1, 1, CPU), lambda _record, checkpoint: saved.append(checkpoint()))
    first_weight = next(iter(saved[0].model))
    saved[0].model[first_weight].fill_(math.nan)  # as if its last step had blown up
    outcomes = dict(train_fused([Member(SMALL, 1, resume=saved[0]), Member(MEMBERS[2], 2)], data, 2, CPU))
    assert isinstance(outcomes[0], DivergedError) and "epoch 2" in str(outcomes[0])
    calm = outcomes[1]
    assert isinstance(calm, TrainResult) and len(calm.history) == 2
    assert all(math.isfinite(r.train_loss) for r in calm.history)


def test_an_interrupt_python_lost_stops_a_fused_group_at_the_next_step(data: FerData) -> None:
    def lose_an_interrupt(record: EpochRecord, _checkpoint: Callable[[], Checkpoint]) -> None:
        assert swallowed_interrupt(signal.SIGTERM)

    members = [Member(SMALL, 1, lose_an_interrupt), Member(MEMBERS[2], 2)]
    ended: list[int] = []
    with signals_interrupt(), pytest.raises(Terminated):
        ended.extend(index for index, _ in train_fused(members, data, EPOCHS, CPU))
    assert ended == []


def test_members_of_another_architecture_are_refused(data: FerData) -> None:
    wider = dataclasses.replace(SMALL, width=1.0)
    with pytest.raises(ValueError, match="architecture"):
        next(train_fused([Member(SMALL, 0), Member(wider, 1)], data, 1, CPU))


@pytest.mark.parametrize(
    "change, shared",
    [
        ({"lr": 0.01, "weight_decay": 0.0, "optimizer": "adamw", "scheduler": "cosine"}, True),
        ({"dropout_high": 0.35, "dropout_low": 0.15, "dropout_head": 0.25}, True),
        ({"batch_size": 64}, False),
        ({"width": 1.0}, False),
        ({"convs_per_block": 2}, False),
        ({"linear_depth": 3}, False),
        ({"dropout_pattern": "every"}, False),
        ({"dropout_low": 0.0}, False),  # a rate of 0 draws no mask: another sequence of random draws
    ],
)
def test_fuse_key(change: dict[str, object], shared: bool) -> None:
    other: TrialParams = dataclasses.replace(SMALL, **change)  # type: ignore[arg-type]
    assert (fuse_key(other) == fuse_key(SMALL)) is shared


def test_weights_gradients_and_optimizer_state_share_a_layout_fused_and_resumed_either_way(
    data: FerData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA's fused Adam refuses a gradient or state laid out otherwise than its weight; the CPU's Adam does
    not mind, so this checks, before every step, what the GPU would. Checkpoints cross between the unfused
    layout (channels_last) and the fused one (contiguous) both ways."""
    steps = []
    adam_step = torch.optim.Adam.step

    def checked_step(optimizer: torch.optim.Optimizer, *args: object, **kwargs: object) -> object:
        for group in optimizer.param_groups:
            for p in group["params"]:
                assert p.grad is not None and p.grad.stride() == p.stride()
                state = [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.dim()]
                assert all(v.stride() == p.stride() for v in state)
        steps.append(optimizer)
        return adam_step(optimizer, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.optim.Adam, "step", checked_step)
    unfused: list[Checkpoint] = []
    train_model(SMALL, data, TrainSettings(1, 1, CPU), lambda _r, checkpoint: unfused.append(checkpoint()))
    fused: list[Checkpoint] = []
    keep = lambda _r, checkpoint: fused.append(Checkpoint.from_bytes(checkpoint().to_bytes()))  # noqa: E731
    members = [Member(SMALL, 1, keep, resume=unfused[0]), Member(MEMBERS[1], 2)]
    assert all(isinstance(outcome, TrainResult) for _, outcome in train_fused(members, data, 3, CPU))
    result = train_model(SMALL, data, TrainSettings(3, 1, CPU), resume=fused[0])  # epoch 2's, resumed alone
    assert len(result.history) == 3 and len(steps) > 10
