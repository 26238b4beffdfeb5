"""Model factories: CIFAR-style ResNets and plain nets for small inputs, torchvision by name.

The CIFAR nets follow He et al. 2016 (section 4.2: three stages of 16/32/64 channels, 6n+2
layers) with projection (1x1 conv + BN) shortcuts where the shape changes ("option B"): the
zero-padding shortcut of option A has no weights for a dependency graph to follow.
"""

from __future__ import annotations

import contextlib
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


def torchvision_model(name: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """An untrained torchvision classification model by name (``resnet18``, ``mobilenet_v2``...),
    its attention modules in head-prunable form. Vision transformers and MaxViT,
    whose position embedding or windows fix the input size, are built for ``image_size``."""
    import torchvision

    from .attention import prunable_form

    names = torchvision_model_names()
    if name not in names:
        raise AutopruneError(f"unknown torchvision classification model {name!r}; choose one of: {', '.join(names)}")
    sized = {}
    if image_size and name.startswith("vit_"):
        sized = {"image_size": image_size}
    elif image_size and name.startswith("maxvit_"):
        sized = {"input_size": (image_size, image_size)}
    return prunable_form(torchvision.models.get_model(name, weights=None, num_classes=num_classes, **sized))


def classifier_layer(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """The layer that produces the model's output (its output channels are never pruned);
    see :func:`output_layers`."""
    return output_layers(model, example_input, train=False)[0]


def output_layers(model: nn.Module, example_input: torch.Tensor, train: bool = False) -> list[nn.Module]:
    """The layer that produces the model's output (its output channels are never pruned).

    Runs ``model`` once on ``example_input`` (in eval mode, with gradients) while hooks on
    every conv and Linear layer record the autograd node of each output, then walks the
    autograd graph breadth-first from the model's output towards its input: the first
    recorded node met is the output layer, the one nearest the output. Registration order
    does not matter, so a block registered after the real head (say a squeeze-and-excitation
    block's Linear layers) is not mistaken for it. Of a tuple, list or dict output the first
    tensor counts. When the graph names no layer (an output without autograd history), the
    last registered Linear is taken, else the last conv.

    With ``train``, the model runs in train mode (its BN statistics restored after), and the
    layer of every tensor it outputs is found, main output first: auxiliary classifiers that
    only run in training (googlenet's ``aux1``/``aux2``, inception's ``AuxLogits``) have
    output layers too.
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
    try:
        x = train_batch(example_input) if train else example_input
        x = x.detach().requires_grad_() if x.is_floating_point() else x
        with in_mode(model, train), torch.enable_grad():
            outs = all_tensors(model(x))
    finally:
        for h in hooks:
            h.remove()
    found = []
    for out in outs[: None if train else 1]:
        layer = _nearest(producer, getattr(out, "grad_fn", None))
        if layer is not None and layer not in found:
            found.append(layer)
    if not found:
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        found.append((linears or layers)[-1])
    return found


def _nearest(producer: dict, start) -> nn.Module | None:
    """The recorded layer nearest ``start`` in the autograd graph (breadth first)."""
    queue, seen = deque([start] if start is not None else []), {start}
    while queue:
        node = queue.popleft()
        if node in producer:
            return producer[node]
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return None


@contextlib.contextmanager
def in_mode(model: nn.Module, train: bool):
    """``model`` in train (or eval) mode for a traced pass, its mode and buffers (BN running
    statistics) as they were afterwards: tracing in train mode changes nothing it keeps."""
    was_training = model.training
    saved = {k: b.detach().clone() for k, b in model.named_buffers()} if train else {}
    model.train(train)
    try:
        yield model
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved:
                    b.copy_(saved[k])


def train_batch(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a batch a train-mode pass accepts: BN in training needs more than one value
    per channel, which one sample at a 1x1 spatial size does not give."""
    return torch.cat([x, x]) if x.shape[0] == 1 else x


def all_tensors(output) -> list[torch.Tensor]:
    """Every tensor in ``output`` (a tensor, or a tuple, list, named tuple or dict of them),
    depth first: the main output first for torchvision's models with auxiliary heads."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [t for item in items for t in all_tensors(item)]


def first_tensor(output) -> torch.Tensor | None:
    """``output`` if it is a tensor, else the first tensor in a tuple, list or dict (depth first)."""
    tensors = all_tensors(output)
    return tensors[0] if tensors else None
