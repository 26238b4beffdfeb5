"""Model factories: CIFAR-style ResNets and plain nets for small inputs, torchvision by name.

The CIFAR nets follow He et al. 2016 (section 4.2: three stages of 16/32/64 channels, 6n+2
layers) with projection (1x1 conv + BN) shortcuts where the shape changes ("option B"): the
zero-padding shortcut of option A has no weights for a dependency graph to follow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import AutopruneError
from ..registry import Registry

# A model factory takes (num_classes, in_channels) and returns an untrained module.
ModelFactory = Callable[[int, int], nn.Module]
SMALL_MODELS: Registry[ModelFactory] = Registry("model")


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a residual add unless ``residual`` is off (plain nets)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, residual: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.relu(out)


class SmallResNet(nn.Module):
    """Stem conv, stages of basic blocks (the first block of each later stage halves the
    resolution and changes the width), global average pooling and a linear classifier."""

    def __init__(
        self,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=False),
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, (width, n) in enumerate(zip(widths, blocks)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(cin, width, stride, residual))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@SMALL_MODELS.register("digits_resnet")
def digits_resnet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The default task's net: 8x8 inputs, widths 32/64, one residual block per stage."""
    return SmallResNet((32, 64), (2, 2), num_classes, in_channels)


@SMALL_MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return SmallResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels)


@SMALL_MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return SmallResNet((16, 32, 64), (9, 9, 9), num_classes, in_channels)


@SMALL_MODELS.register("plain20")
def plain20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return SmallResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels, residual=False)


def torchvision_model_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_model(name: str, num_classes: int) -> nn.Module:
    """An untrained torchvision classification model by name (``resnet18``, ``mobilenet_v2``...)."""
    import torchvision

    names = torchvision_model_names()
    if name not in names:
        raise AutopruneError(f"unknown torchvision classification model {name!r}; choose one of: {', '.join(names)}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def classifier_layer(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """The layer that produces the model's output (its output channels are never pruned).

    Runs ``model`` once on ``example_input`` (in eval mode, with gradients) while hooks on
    every conv and Linear layer record the autograd node of each output, then walks the
    autograd graph breadth-first from the model's output towards its input: the first
    recorded node met is the output layer, the one nearest the output. Registration order
    does not matter, so a block registered after the real head (say a squeeze-and-excitation
    block's Linear layers) is not mistaken for it. Of a tuple, list or dict output the first
    tensor counts. When the graph names no layer (an output without autograd history), the
    last registered Linear is taken, else the last conv.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    if not layers:
        raise AutopruneError(
            f"the model ({type(model).__name__}) has no Linear or Conv layer to treat as its output layer"
        )
    producer: dict = {}  # autograd node -> the layer whose output it is

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            producer[output.grad_fn] = module

    hooks = [m.register_forward_hook(record) for m in layers]
    was_training = model.training
    try:
        model.eval()
        x = example_input.detach().requires_grad_() if example_input.is_floating_point() else example_input
        with torch.enable_grad():
            out = first_tensor(model(x))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    start = getattr(out, "grad_fn", None)
    queue, seen = deque([start] if start is not None else []), {start}
    while queue:
        node = queue.popleft()
        if node in producer:
            return producer[node]
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                queue.append(parent)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return (linears or layers)[-1]


def first_tensor(output) -> torch.Tensor | None:
    """``output`` if it is a tensor, else the first tensor in a tuple, list or dict (depth first)."""
    if isinstance(output, torch.Tensor):
        return output
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        if (found := first_tensor(item)) is not None:
            return found
    return None
