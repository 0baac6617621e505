"""Models by name (visionflow's own, torchvision's, timm's), whitening initialization, and a model summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionflow.config import MODEL_NAMES, TIMM_PREFIX
from visionflow.data.transforms import BatchTransform
from visionflow.errors import ConfigError
from visionflow.tables import COUNT, TEXT, Table, text_table


def build_tudui(num_classes: int) -> nn.Module:
    """The tutorial's CIFAR-10 network, layer for layer (no activations, as in the tutorial)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2),  # (B, 32, 32, 32)
        nn.MaxPool2d(2),  # (B, 32, 16, 16)
        nn.Conv2d(32, 32, 5, padding=2),  # (B, 32, 16, 16)
        nn.MaxPool2d(2),  # (B, 32, 8, 8)
        nn.Conv2d(32, 64, 5, padding=2),  # (B, 64, 8, 8)
        nn.MaxPool2d(2),  # (B, 64, 4, 4)
        nn.Flatten(),  # (B, 1024)
        nn.Linear(1024, 64),  # (B, 64)
        nn.Linear(64, num_classes),  # (B, num_classes)
    )


def build_resnet18_cifar(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 adapted for 32x32 images: a 3x3 stride-1 stem and no max-pool,
    so a 32x32 input still reaches the last stage at 4x4 instead of 1x1."""
    from torchvision.models import resnet18  # here: torchvision's import costs ~2 s (torch._dynamo)

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "tudui": build_tudui,
    "resnet18_cifar": build_resnet18_cifar,
}


def model_names(timm_models: bool) -> frozenset[str]:
    """The names torchvision's classification models go by, or timm's (with and without a
    pretrained tag: resnet18, resnet18.a1_in1k), as model.name spells them after TIMM_PREFIX."""
    if timm_models:
        import timm  # here: only a timm/ name pays for importing timm

        return frozenset(timm.list_models()) | frozenset(timm.list_models(pretrained=True))
    import torchvision  # here: torchvision's import costs ~2 s (torch._dynamo)

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build model `name` (config.ModelConfig.name: one of MODELS, a torchvision classification
    model, or timm/<name>) with randomly initialized weights and a `num_classes`-way head; an
    unknown name raises ConfigError naming the valid ones."""
    if num_classes < 2:
        raise ConfigError(f"Invalid num_classes {num_classes}: a classifier needs at least 2 classes")
    if name in MODELS:
        return MODELS[name](num_classes)
    is_timm = name.startswith(TIMM_PREFIX)
    if name.removeprefix(TIMM_PREFIX) not in model_names(is_timm):
        raise ConfigError(
            f"Invalid model '{name}'. Choose from: {', '.join(MODEL_NAMES)}, a torchvision classification "
            f"model or {TIMM_PREFIX}<a timm model>"
        )
    if is_timm:
        import timm

        return timm.create_model(name.removeprefix(TIMM_PREFIX), pretrained=False, num_classes=num_classes)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def head_name(model: nn.Module) -> str:
    """The qualified name of the classifier head, the layer made for the dataset's classes: timm's
    own record of it (pretrained_cfg "classifier"), else the last Linear layer, else the last
    Conv2d (squeezenet's 1x1 classifier)."""
    recorded = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(recorded, str) and recorded in dict(model.named_modules()):
        return recorded
    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, module in model.named_modules() if isinstance(module, kind)]
        if names:
            return names[-1]
    raise ConfigError(f"Model {type(model).__name__} has no Linear or Conv2d layer to use as its classifier head")


def is_head(name: str, head: str) -> bool:
    """Whether parameter, buffer or module `name` belongs to the head module `head`."""
    return name == head or name.startswith(head + ".")


WHITEN_PIXELS = 512 * 32 * 32  # pixels of the images whose patches estimate the covariance: 512 at 32 px
WHITEN_EPS = 1e-2  # added to each eigenvalue: bounds the gain of the near-empty patch directions
WHITEN_SCALE = 0.3  # filter scale (1 = unit-variance outputs); 0.3 trained best at 4-5 epochs (config.RECIPES)
_WHITEN_CHUNK_PIXELS = 64 * 32 * 32  # pixels unfolded at a time: 64 x 784 x 75 float32 patches = 15 MB for tudui


def whiten_images(image_size: int) -> int:
    """How many images `whiten_first_conv` needs at `image_size`: WHITEN_PIXELS' worth, at least 16."""
    return max(16, WHITEN_PIXELS // image_size**2)


def whiten_first_conv(model: nn.Module, images: Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    """Initialize the model's first convolution as a whitening of the patches it sees (airbench's
    trick): its filters become the top eigenvectors of the patch covariance of `images` (uint8
    (N, 3, H, W), normalized with `mean`/`std`), each divided by the square root of its eigenvalue,
    and its bias 0. Filters beyond the patch dimension keep their initialization. Deterministic:
    no random numbers are drawn."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    normalize = BatchTransform(mean, std, "cpu")  # what training feeds the model
    dim = conv.weight[0].numel()  # in_channels x kh x kw
    moment, total, count = torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
    for chunk in images.split(max(1, _WHITEN_CHUNK_PIXELS // (images.shape[-2] * images.shape[-1]))):
        patches = F.unfold(
            normalize(chunk), conv.kernel_size, dilation=conv.dilation, stride=conv.stride
        )  # (B, dim, L)
        patches = patches.transpose(1, 2).reshape(-1, dim).double()  # (B * L, dim)
        moment += patches.T @ patches
        total += patches.sum(0)
        count += len(patches)
    average = total / count
    covariance = (moment - count * torch.outer(average, average)) / (count - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    n = min(conv.out_channels, dim)
    filters = (eigenvectors[:, -n:] / (eigenvalues[-n:] + WHITEN_EPS).sqrt()).T  # (n, dim)
    with torch.no_grad():
        conv.weight[:n] = (WHITEN_SCALE * filters).view(n, *conv.weight.shape[1:]).to(conv.weight.dtype)
        if conv.bias is not None:
            conv.bias[:n] = 0


@dataclass
class LayerSummary:
    name: str
    kind: str
    output_shape: list[int]
    num_parameters: int


@dataclass
class ModelSummary:
    num_parameters: int
    trainable_parameters: int
    input_shape: list[int]
    layers: list[LayerSummary]
    head: str  # the classifier head's name (`head_name`)
    head_parameters: int

    def to_text(self) -> str:
        rows = tuple((r.name, r.kind, str(r.output_shape), r.num_parameters) for r in self.layers)
        layers = Table(("layer", "type", "output shape", "params"), rows, (TEXT, TEXT, TEXT, COUNT))
        total = f"total parameters: {self.num_parameters:,} (trainable {self.trainable_parameters:,})"
        head = f"classifier head: {self.head} ({self.head_parameters:,} parameters)"
        return "\n".join((text_table(layers), total, head))


def summarize(model: nn.Module, input_size: int = 32) -> ModelSummary:
    """Parameter count and every leaf layer's output shape for one (1, 3, S, S) input."""
    layers: list[LayerSummary] = []

    def record(name: str):
        def hook(module: nn.Module, _inputs, output):
            layers.append(
                LayerSummary(
                    name,
                    type(module).__name__,
                    list(output.shape),
                    sum(p.numel() for p in module.parameters(recurse=False)),
                )
            )

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_hook(record(n)) for n, m in leaves]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    head = head_name(model)
    return ModelSummary(
        num_parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        input_shape=[1, 3, input_size, input_size],
        layers=layers,
        head=head,
        head_parameters=sum(p.numel() for name, p in model.named_parameters() if is_head(name, head)),
    )
