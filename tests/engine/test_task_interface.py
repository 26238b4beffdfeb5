"""The task interface beyond classification: metrics with a direction, a task's own loss,
dict batches and dict outputs, token inputs, the user's train step and optimiser, and the
three example tasks (segmentation, regression, token classifier) pruned end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from autoprune import engine
from autoprune.config import Budget, EngineConfig, FinetuneConfig, Policy, TaskConfig
from autoprune.contract import metric_mode
from autoprune.engine.checkpoint import architecture_key, load_model, save_model
from autoprune.engine.inputs import Tokens, model_input
from autoprune.engine.measure import measure
from autoprune.engine.models import first_tensor
from autoprune.engine.tasks import MAE, RMSE, Accuracy, MeanIoU, Task, get_task
from autoprune.errors import AutopruneError

# ------------------------------------------------------------------ metrics


def test_mean_iou_matches_a_per_class_count():
    rng = np.random.default_rng(0)
    k = 4
    target = rng.integers(0, k, (3, 9, 9))
    target[0, 0, :4] = 255  # ignored pixels
    logits = rng.normal(size=(3, k, 9, 9))
    pred = logits.argmax(1)
    keep = target != 255
    ious = []
    for c in range(k):
        inter = np.sum((pred == c) & (target == c) & keep)
        union = np.sum(((pred == c) | (target == c)) & keep)
        if union:
            ious.append(inter / union)
    m = MeanIoU(k)
    m.reset()
    for i in range(3):  # batch by batch: one confusion matrix over the split
        m.update(torch.tensor(logits[i : i + 1]), torch.tensor(target[i : i + 1]))
    assert m.compute() == pytest.approx(np.mean(ious), rel=1e-12)


def test_regression_metrics_and_their_direction():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(20, 1)), rng.normal(size=20)
    rmse, mae = RMSE(), MAE()
    for m in (rmse, mae):
        m.reset()
        m.update(torch.tensor(pred[:7]), torch.tensor(target[:7]))
        m.update(torch.tensor(pred[7:]), torch.tensor(target[7:]))
    diff = pred[:, 0] - target
    assert rmse.compute() == pytest.approx(np.sqrt(np.mean(diff**2)))
    assert mae.compute() == pytest.approx(np.mean(np.abs(diff)))
    assert (metric_mode("val_rmse"), metric_mode("test_mae"), metric_mode("val_acc")) == ("min", "min", "max")


class Top2(Accuracy):
    name, higher_is_better, percent = "top2", True, True

    def update(self, prediction, target) -> None:
        self.correct += int((prediction.topk(2, 1).indices == target[:, None]).any(1).sum())
        self.total += len(target)


def _tiny(**kw) -> Task:
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = TensorDataset(x, y)
    fields = {
        "name": "tiny",
        "model_name": "mlp",
        "model_factory": lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)),
        "train": data,
        "val": data,
        "test": data,
        "input_shape": (4,),
        "num_classes": 3,
        "batch_size": 16,
    }
    return Task(**{**fields, **kw})


def test_a_task_metric_is_declared_and_checked():
    task = _tiny(metric=Top2())
    assert task.metric_key() == "val_top2" and metric_mode("test_top2") == "max"
    model = task.model_factory()
    score = engine.evaluate(model, task.loader("val"), task=task)
    x, y = task.val.tensors
    expected = (model(x).topk(2, 1).indices == y[:, None]).any(1).float().mean().item()
    assert score == pytest.approx(expected)
    with pytest.raises(AutopruneError, match="metric must be an autoprune Metric"):
        _tiny(metric="acc")

    class Clash(RMSE):
        name = "top2"  # taken by a metric where higher is better

    with pytest.raises(AutopruneError, match="'top2' is taken by a metric where max is better"):
        _tiny(metric=Clash())


class Balanced(Accuracy):
    name = "bacc"  # balanced accuracy: the user's evaluate computes it, this names it


def balanced_accuracy(model, loader) -> float:
    """The mean over classes of the fraction of each class predicted right."""
    preds, targets = zip(*((model(x).argmax(1), y) for x, y in loader))
    pred, target = torch.cat(preds), torch.cat(targets)
    return float(torch.stack([(pred[target == c] == c).float().mean() for c in target.unique()]).mean())


def test_the_users_evaluate_gives_the_metric_its_value():
    task = _tiny(metric=Balanced(), evaluate=balanced_accuracy)
    model = task.model_factory()
    history = engine.train(model, task, FinetuneConfig(epochs=1, lr=0.01), 0, torch.device("cpu"))
    x, y = task.val.tensors
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    expected = np.mean([(pred[y == c] == c).float().mean().item() for c in range(3) if (y == c).any()])
    assert history[0]["val_bacc"] == pytest.approx(expected) and "val_acc" not in history[0]
    with pytest.raises(AutopruneError, match="evaluate must be callable"):
        _tiny(evaluate=1.0)


# ------------------------------------------------------------------ batches, outputs, inputs


class DictSamples(Dataset):
    """Samples as dicts, the way HuggingFace datasets give them."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i], "id": i}


class DictOut(nn.Module):
    """A CNN returning an output object: a dict with a feature map before the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        f = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x)))))
        return {"hidden": f, "logits": self.head(f.mean((2, 3)))}


def test_dict_batches_and_a_named_output_prune_and_train():
    data = DictSamples(48)
    task = Task(
        name="dicts",
        model_name="dictout",
        model_factory=DictOut,
        train=data,
        val=data,
        test=data,
        input_shape=(1, 8, 8),
        num_classes=3,
        batch_size=16,
        input_key="pixel_values",
        target_key="labels",
        output="logits",
    )
    model = task.model_factory()
    history = engine.train(model, task, FinetuneConfig(epochs=1, lr=0.05), 0, torch.device("cpu"))
    assert set(history[0]) == {"loss", "val_acc", "val_loss"}
    result = engine.run(task, model, Policy(criterion="taylor"), Budget("flops", 0.5), EngineConfig(), test=True)
    assert result.pruned["flops_ratio"] <= 0.5 + 1e-9
    assert result.model.head.out_features == 3 and "test_acc" in result.pruned
    with pytest.raises(AutopruneError, match="its samples are dicts; set input_key and target_key"):
        Task(**{**task.__dict__, "input_key": 0, "target_key": 1})


def test_token_inputs_are_integer_ids_everywhere():
    shape = Tokens((12,), vocab=50)
    x = model_input(shape, 5)
    assert x.dtype == torch.long and x.shape == (5, 12) and 0 <= int(x.min()) and int(x.max()) < 50
    assert model_input(shape, 2, zeros=True).abs().sum() == 0 and model_input((3, 4), 2).dtype == torch.float32
    import pickle

    again = pickle.loads(pickle.dumps(shape))
    assert again == shape and again.vocab == 50 and isinstance(again, Tokens)
    task = get_task(TaskConfig(name="tokens"))
    cost = measure(task.model_factory(), task.input_shape, None, latency=False)
    assert cost.flops > 0


# ------------------------------------------------------------------ the user's own recipe


class Recipe:
    """A user's train step (label smoothing, a random shift as augmentation) and optimiser
    (AdamW with a one-cycle schedule), counting the calls."""

    def __init__(self) -> None:
        self.steps = self.optimisers = 0

    def train_step(self, model, x, y):
        self.steps += 1
        shift = int(torch.randint(-1, 2, ()))
        return nn.functional.cross_entropy(model(torch.roll(x, shift, -1)), y, label_smoothing=0.1)

    def optimizer(self, params, lr, total_steps):
        self.optimisers += 1
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total_steps)


def test_the_users_train_step_and_optimiser_run_in_every_training(tmp_path):
    recipe = Recipe()
    base = get_task(TaskConfig(batch_size=128))
    task = Task(**{**base.__dict__, "train_step": recipe.train_step, "optimizer": recipe.optimizer})
    per_epoch = len(task.loader("train"))
    cfg = EngineConfig(task=TaskConfig(batch_size=128), train_epochs=2, cache_dir=str(tmp_path))
    dense = engine.dense_model(task, cfg, log=lambda s: None)
    assert (recipe.steps, recipe.optimisers) == (2 * per_epoch, 1)
    policy = Policy(finetune=FinetuneConfig(epochs=2))
    result = engine.run(task, dense, policy, Budget("flops", 0.5), cfg)
    assert (recipe.steps, recipe.optimisers) == (4 * per_epoch, 2)
    assert result.pruned["flops_ratio"] <= 0.5 + 1e-9 and len(result.epochs) == 2
    with pytest.raises(AutopruneError, match="must return a torch.optim.Optimizer"):
        engine.train(
            task.model_factory(),
            Task(**{**task.__dict__, "optimizer": lambda params, lr, total_steps: "sgd"}),
            FinetuneConfig(epochs=1),
            0,
            torch.device("cpu"),
        )


# ------------------------------------------------------------------ the example tasks


@pytest.mark.parametrize(
    ("name", "options", "key", "head"),
    [
        ("diabetes", {}, "rmse", lambda m: m.net[-1].out_features),
        ("tokens", {}, "acc", lambda m: m.head.out_features),
        ("shapes", {"image_size": 32}, "miou", lambda m: m(torch.zeros(1, 3, 32, 32))["out"].shape[1]),
    ],
)
def test_the_example_tasks_prune_to_budget_on_their_own_metric(tmp_path, name, options, key, head):
    cfg = EngineConfig(task=TaskConfig(name=name, batch_size=32, **options), train_epochs=1, cache_dir=str(tmp_path))
    task = get_task(cfg.task)
    dense = engine.dense_model(task, cfg, log=lambda s: None)
    before = head(dense.eval())
    result = engine.run(task, dense, Policy(criterion="taylor", scope="global"), Budget("flops", 0.5), cfg, test=True)
    assert result.pruned["flops_ratio"] <= 0.5 + 1e-9
    assert {f"val_{key}", f"test_{key}"} <= set(result.pruned) and "val_acc" not in result.pruned or key == "acc"
    assert head(result.model.eval()) == before  # the output head keeps its width
    path = tmp_path / "model.pt"
    save_model(path, result.model, cfg.task, "channel", result.history, {}, {}, architecture_key(dense))
    reloaded, _, _ = load_model(str(path), None)
    x = task.example_input(2)
    with torch.no_grad():
        assert torch.equal(first_tensor(reloaded.eval()(x)), first_tensor(result.model.eval()(x)))
