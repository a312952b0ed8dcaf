"""ResNet-18 and ResNet-50 (He et al. 2016) adapted to 32x32 CIFAR images.

The CIFAR adaptation is the usual one: a 3x3 stride-1 stem convolution and no
max-pool, so the four stages see 32, 16, 8 and 4 pixels; then global average
pooling and one Linear head. ResNet-18 with 10 classes has 11,173,962 parameters,
ResNet-50 with 100 classes 23,705,252.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib.core.errors import ConfigError
from lib.core.structures import Part, ResidualBlock, Structure, rows_and_columns

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, inner: tuple[int, ...] = (),
                 out_planes: int = 0, projection: bool | None = None) -> None:
        """``inner``, ``out_planes``: widths surgery narrowed (default: ``planes``); ``projection``: whether
        the shortcut projects (default: when the published shapes differ)."""
        super().__init__()
        (width,) = inner or (planes,)  # conv1's output channels: fewer once surgery removed some
        out_planes = out_planes or planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride, projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50 and up).

    The stride sits on the 3x3 convolution (the "ResNet v1.5" placement), which is
    what torchvision and most CIFAR ports use; the parameter count is the same either way.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, inner: tuple[int, ...] = (),
                 out_planes: int = 0, projection: bool | None = None) -> None:
        super().__init__()
        out_planes = out_planes or planes * self.expansion
        w1, w2 = inner or (planes, planes)  # conv1's and conv2's output channels (surgery may narrow them)
        self.conv1 = nn.Conv2d(in_planes, w1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride, projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int, projection: bool | None = None) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 projection with BatchNorm (option B). After surgery
    the widths may meet by chance: ``projection`` then keeps the published kind."""
    if projection is None:
        projection = stride != 1 or in_planes != out_planes
    if not projection:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ResNet(nn.Module):
    """A CIFAR ResNet: stem, four stages of residual blocks, average pool, Linear head.

    Layers are named attributes (conv1, bn1, layer1..layer4, fc) so pruning and
    surgery code can address them by name.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int],
                 num_classes: int = 10, in_channels: int = 3, inner: list[list[int]] | None = None,
                 streams: list[int] | None = None) -> None:
        """``inner``: each block's internal widths in forward order; ``streams``: the residual streams'
        widths (the stem's, then one per stage whose first block projects), as ``architecture()`` gives
        them after surgery; None for the published widths."""
        super().__init__()
        widths, published = iter(inner or []), _published_streams(block)
        stream = iter(streams or published)
        in_planes = next(stream)
        self.conv1 = nn.Conv2d(in_channels, in_planes, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        published_in = 64
        stages = []
        for i, (width, count) in enumerate(zip(STAGE_WIDTHS, blocks, strict=True)):
            stride = 1 if i == 0 else 2  # the first stage keeps 32x32: there is no max-pool
            projection = stride != 1 or published_in != width * block.expansion
            out_planes = next(stream) if projection else in_planes
            layers = []
            for j in range(count):
                layers.append(block(in_planes, width, stride if j == 0 else 1, tuple(next(widths, ())), out_planes,
                                    projection and j == 0))
                in_planes = out_planes
            published_in = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"layer{i}.{j}", b) for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4),
                                                                1) for j, b in enumerate(stage)]

    def structures(self) -> list[Structure]:
        """Channels (lib/core/structures.py): inside each residual block, a conv's output channel and the next
        conv's matching input channel; on each residual stream, one channel of every conv that writes
        the stream (the stem or a projection, and each block's last conv) with the matching input
        channel of every conv (and of the head) that reads it: coupled across the additions."""
        return self._inner_channels() + self._stream_channels()

    def _streams(self) -> list[dict[str, Any]]:
        """The residual streams in forward order: who writes them (rows) and who reads them (columns)."""
        current: dict[str, Any] = {"group": "conv1", "write": ["conv1.weight"], "read": [],
                                   "width": self.conv1.out_channels}
        streams = [current]
        for name, block in self._blocks():
            current["read"] += [f"{name}.conv1.weight"]
            if not isinstance(block.shortcut, nn.Identity):
                current["read"] += [f"{name}.shortcut.0.weight"]
                current = {"group": f"{name}.shortcut", "write": [f"{name}.shortcut.0.weight"], "read": [],
                           "width": block.shortcut[0].out_channels}
                streams.append(current)
            last = "conv3" if hasattr(block, "conv3") else "conv2"
            current["write"] += [f"{name}.{last}.weight"]
        current["read"] += ["fc.weight"]
        return streams

    def _stream_channels(self) -> list[Structure]:
        return [Structure("channel", s["group"], tuple(Part(w, 0, (c,)) for w in s["write"])
                          + tuple(Part(r, 1, (c,)) for r in s["read"]))
                for s in self._streams() for c in range(s["width"])]

    def _inner_channels(self) -> list[Structure]:
        found = []
        for name, block in self._blocks():
            convs = [f"{name}.conv{k}" for k in (1, 2, 3) if hasattr(block, f"conv{k}")]
            for k, (producer, consumer) in enumerate(zip(convs, convs[1:], strict=False), 1):
                found += rows_and_columns("channel", f"{name}.conv{k}", f"{producer}.weight", f"{consumer}.weight",
                                          getattr(block, f"conv{k}").out_channels)
        return found

    def architecture(self) -> dict[str, Any]:
        """Blocks per stage, each block's internal widths and each residual stream's width (lib/surgery/cut.py;
        the task rebuilds from it)."""
        return {"blocks": [len(s) for s in (self.layer1, self.layer2, self.layer3, self.layer4)],
                "inner": [[getattr(b, f"conv{k}").out_channels for k in (1, 2) if hasattr(b, f"conv{k + 1}")]
                          for _, b in self._blocks()],
                "streams": [s["width"] for s in self._streams()]}

    def architecture_without(self, removed: list[Structure], blocks: list[str]) -> dict[str, Any]:
        """The architecture once the ``removed`` channels and the residual ``blocks`` are gone."""
        arch, names = self.architecture(), [name for name, _ in self._blocks()]
        streams = [s["group"] for s in self._streams()]
        for unit in removed:
            if unit.group in streams:  # a residual stream's channel
                arch["streams"][streams.index(unit.group)] -= 1
                continue
            block, conv = unit.group.rsplit(".", 1)  # group "layer2.1.conv1": the block's first internal width
            arch["inner"][names.index(block)][int(conv.removeprefix("conv")) - 1] -= 1
        for name in blocks:
            arch["blocks"][int(name.split(".")[0].removeprefix("layer")) - 1] -= 1
        arch["inner"] = [w for name, w in zip(names, arch["inner"], strict=True) if name not in blocks]
        return arch

    def residual_blocks(self) -> list[ResidualBlock]:
        """Blocks with an identity shortcut: all parameters zero, the block returns relu(0 + x) = x, x >= 0
        being a ReLU's output. Blocks that change the shape (a projection shortcut) cannot be dropped."""
        return [ResidualBlock(name, b) for name, b in self._blocks() if isinstance(b.shortcut, nn.Identity)]

    def _init_weights(self) -> None:
        # He initialisation for ReLU networks (as torchvision does); BatchNorm starts as identity.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes) for images of shape (N, C, 32, 32)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # global average pool as a mean: adaptive_avg_pool2d's CUDA backward is not deterministic
        return self.fc(x.mean(dim=(2, 3)))


def _published_streams(block: type[BasicBlock] | type[Bottleneck]) -> list[int]:
    """The residual streams' published widths: the stem's, then each stage's whose first block projects."""
    widths, current = [64], 64
    for i, width in enumerate(STAGE_WIDTHS):
        if i > 0 or current != width * block.expansion:
            widths.append(width * block.expansion)
        current = width * block.expansion
    return widths


def resnet18(num_classes: int = 10, architecture: dict[str, Any] | None = None) -> ResNet:
    """ResNet-18: BasicBlocks [2, 2, 2, 2]; 11,173,962 parameters for 10 classes."""
    return _built(BasicBlock, (2, 2, 2, 2), num_classes, architecture)


def resnet50(num_classes: int = 100, architecture: dict[str, Any] | None = None) -> ResNet:
    """ResNet-50: Bottlenecks [3, 4, 6, 3]; 23,705,252 parameters for 100 classes."""
    return _built(Bottleneck, (3, 4, 6, 3), num_classes, architecture)


def _built(block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int], num_classes: int,
           architecture: dict[str, Any] | None) -> ResNet:
    if architecture is None:
        return ResNet(block, blocks, num_classes)
    try:
        counts = tuple(int(n) for n in architecture["blocks"])
        inner = [[int(w) for w in widths] for widths in architecture["inner"]]
        streams = [int(w) for w in architecture["streams"]]
        if (len(counts) != 4 or len(inner) != sum(counts) or len(streams) != len(_published_streams(block))
                or min(min(w) for w in [*inner, streams]) < 1):
            raise ValueError("block counts and widths disagree")
        return ResNet(block, counts, num_classes, inner=inner, streams=streams)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"ResNet architecture {architecture!r} is not one ResNet.architecture() wrote "
                          f"({type(exc).__name__}: {exc})") from None
