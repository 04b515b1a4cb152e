"""TorchScript models for the Triton-style repository in ``tests/data/repository``.

The repository holds only ``config.pbtxt`` files (and warm-up data); no model file is
committed. :func:`build` writes, into a *copy* of it, a TorchScript model matching
each configuration: its ``forward`` takes the configured inputs (by argument name,
by the ``INPUT__<i>`` position, or as one ``Dict[str, Tensor]``), returns the
configured outputs in order (``List[str]`` for ``TYPE_STRING``), and computes
something checkable, written in its class docstring. :func:`example` gives a request
for each model and the outputs it must produce, so that a test can do::

    shutil.copytree(triton_models.REPOSITORY, tmp / "repo")
    served = triton_models.build(tmp / "repo")
    with Pool(tmp / "repo") as pool:
        for name in served:
            for version in triton_models.RECIPES[name].served:
                inputs, expected = triton_models.example(name, version)
                out = pool.infer(name, inputs, version=version)
                triton_models.check(name, out, expected)
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from libtorchrt.config.pbtxt import parse

__all__ = ["IGNORED_VERSION", "RECIPES", "REPOSITORY", "Recipe", "build", "check", "example"]

#: The committed repository (configurations and warm-up data only).
REPOSITORY = Path(__file__).resolve().parent / "data" / "repository"
#: What the models in directories that are not versions compute with (they must never run).
IGNORED_VERSION = 99

Inputs = dict[str, Any]


# ── the models ─────────────────────────────────────────────────────────────────────


class ChannelMeans(nn.Module):
    """resnet_classifier: ``OUTPUT__0[:, k]`` = mean of channel ``k % 3`` of ``INPUT__0``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3)).repeat(1, 4)[:, :10]


class Embedder(nn.Module):
    """bert_embedder: ``h = (input_ids * attention_mask + token_type_ids)[..., None] * [1..8]``;
    ``last_hidden_state = h``, ``pooler_output = h.sum(1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(1.0, 9.0))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, Tensor]:
        h = (input_ids * attention_mask + token_type_ids).float().unsqueeze(-1) * self.scale
        return h, h.sum(dim=1)


class Normalizer(nn.Module):
    """text_normalizer: ``OUTPUT__0`` = each string stripped and lower-cased;
    ``OUTPUT__1`` = their lengths (int64)."""

    def forward(self, texts: list[str]) -> tuple[list[str], Tensor]:
        out = [t.strip().lower() for t in texts]
        return out, torch.tensor([len(t) for t in out], dtype=torch.int64)


class DictRanker(nn.Module):
    """dict_ranker (one ``Dict[str, Tensor]`` argument): ``score = (query * document).sum(1, keepdim)``."""

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return (inputs["query"] * inputs["document"]).sum(dim=1, keepdim=True)


class Detector(nn.Module):
    """yolo_detector: ``m`` = mean of each image; ``scores = m * [1..5] / 5``; every box
    coordinate of box ``j`` equals ``scores[:, j]``."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        scores = images.mean(dim=(1, 2, 3)).unsqueeze(1) * torch.arange(1.0, 6.0) / 5.0
        return scores.unsqueeze(-1).repeat(1, 1, 4), scores


class RowSum(nn.Module):
    """tabular_regressor (and every version): ``OUTPUT__0 = INPUT__0.sum(1, keepdim) * version``."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version

    def forward(self, x: Tensor) -> Tensor:
        return x.sum(dim=1, keepdim=True) * self.version


class PixelMean(nn.Module):
    """mnist_uint8: ``logits[:, k]`` = mean pixel value + ``k``."""

    def forward(self, image: Tensor) -> Tensor:
        return image.float().mean(dim=(1, 2, 3)).unsqueeze(1) + torch.arange(10.0)


class Affine(nn.Module):
    """scalar_affine: ``y = 2 x + 1`` (the model sees a batch of scalars, shape ``[N]``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2.0 + 1.0


class AddVersion(nn.Module):
    """seq2seq_generator and legacy_noname: the input plus ``version`` (ids shifted per version)."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version

    def forward(self, ids: Tensor) -> Tensor:
        return ids + self.version


class Predictor(nn.Module):
    """custom_method: ``forward`` is the identity; ``predict`` (the method served) is ``3 x``."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    @torch.jit.export
    def predict(self, x: Tensor) -> Tensor:
        return x * 3.0


class OptionalBias(nn.Module):
    """optional_bias: ``x + bias``, or ``x`` when ``bias`` is not sent."""

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if bias is None:
            return x
        return x + bias


class MaskedSum(nn.Module):
    """masked_bf16: ``OUTPUT__0 = (INPUT__0 * INPUT__1).sum(1, keepdim)`` in float32."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return (x.float() * mask.float()).sum(dim=1, keepdim=True)


class Half(nn.Module):
    """gpu_segmenter: ``OUTPUT__0 = INPUT__0 / 2`` (float16)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5


class CumSum(nn.Module):
    """multi_group: the running sum of ``INPUT__0``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cumsum(x, dim=0)


class TokenEmbedding(nn.Module):
    """token_embedding: token ``t`` embeds as ``t * [1, 2, 3, 4]`` (vocabulary of 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.arange(16.0).unsqueeze(1) * torch.arange(1.0, 5.0))

    def forward(self, token_ids: Tensor) -> Tensor:
        return torch.nn.functional.embedding(token_ids, self.weight)


class TwoStats(nn.Module):
    """two_stats: ``mean`` and ``std`` of each row (outputs not named ``OUTPUT__<i>``)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.mean(dim=1, keepdim=True), x.std(dim=1, keepdim=True)


# ── what to build, and how to check it ─────────────────────────────────────────────


@dataclass(frozen=True)
class Recipe:
    """How to build one model of the repository and what a request must give.

    Attributes:
        make: builds the module for a version.
        example: ``(version) -> (inputs, expected outputs)``.
        versions: version directories to write.
        served: the versions the configuration's policy serves (of ``versions``).
        ignored: directories that are not versions (a model inside must not be served).
        gpu: needs a CUDA device (``KIND_GPU``).
        dict_input: ``forward`` takes one ``Dict[str, Tensor]`` of the inputs.
    """

    make: Callable[[int], nn.Module]
    example: Callable[[int], tuple[Inputs, Inputs]]
    versions: tuple[int, ...] = (1,)
    served: tuple[int, ...] = (1,)
    ignored: tuple[str, ...] = ()
    gpu: bool = False
    dict_input: bool = False


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _resnet(v: int) -> tuple[Inputs, Inputs]:
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    m = x.mean(dim=(2, 3))
    return {"INPUT__0": x}, {"OUTPUT__0": torch.cat([m, m, m, m[:, :1]], dim=1)}


def _bert(v: int) -> tuple[Inputs, Inputs]:
    ids = torch.tensor([[101, 7, 9, 102], [101, 5, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    types = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    h = (ids * mask + types).float().unsqueeze(-1) * torch.arange(1.0, 9.0)
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return inputs, {"last_hidden_state": h, "pooler_output": h.sum(dim=1)}


def _text(v: int) -> tuple[Inputs, Inputs]:
    texts = ["  Hello, World ", "TorchScript", ""]
    return {"INPUT__0": texts}, {
        "OUTPUT__0": ["hello, world", "torchscript", ""],
        "OUTPUT__1": torch.tensor([12, 11, 0]),
    }


def _dict(v: int) -> tuple[Inputs, Inputs]:
    q = torch.rand(3, 16, generator=_gen(1))
    d = torch.rand(3, 16, generator=_gen(2))
    return {"query": q, "document": d}, {"score": (q * d).sum(dim=1, keepdim=True)}


def _yolo(v: int) -> tuple[Inputs, Inputs]:
    images = torch.rand(2, 3, 40, 24, generator=_gen(3))
    scores = images.mean(dim=(1, 2, 3)).unsqueeze(1) * torch.arange(1.0, 6.0) / 5.0
    return {"images": images}, {"boxes": scores.unsqueeze(-1).expand(2, 5, 4), "scores": scores}


def _tabular(v: int) -> tuple[Inputs, Inputs]:
    x = torch.rand(5, 12, generator=_gen(4), dtype=torch.float64)
    return {"INPUT__0": x}, {"OUTPUT__0": x.sum(dim=1, keepdim=True) * v}


def _mnist(v: int) -> tuple[Inputs, Inputs]:
    image = torch.randint(0, 256, (3, 28, 28, 1), generator=_gen(5), dtype=torch.uint8)
    m = image.float().mean(dim=(1, 2, 3)).unsqueeze(1)
    return {"image": image}, {"logits": m + torch.arange(10.0)}


def _affine(v: int) -> tuple[Inputs, Inputs]:
    x = torch.tensor([[0.0], [1.5], [-2.0]])
    return {"x": x}, {"y": x * 2 + 1}


def _seq2seq(v: int) -> tuple[Inputs, Inputs]:
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    return {"input_ids": ids}, {"output_ids": ids + v}


def _custom(v: int) -> tuple[Inputs, Inputs]:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float16)
    return {"INPUT__0": x}, {"OUTPUT__0": x * 3}


def _optional(v: int) -> tuple[Inputs, Inputs]:
    x = torch.ones(2, 4)
    bias = torch.arange(4.0).expand(2, 4).contiguous()
    return {"x": x, "bias": bias}, {"OUTPUT__0": x + bias}


def _masked(v: int) -> tuple[Inputs, Inputs]:
    x = torch.arange(12.0).reshape(2, 6).to(torch.bfloat16)
    mask = torch.tensor([[True, False, True, False, True, False], [False] * 6])
    return {"INPUT__0": x, "INPUT__1": mask}, {"OUTPUT__0": torch.tensor([[6.0], [0.0]])}


def _half(v: int) -> tuple[Inputs, Inputs]:
    x = torch.rand(1, 3, 64, 64, generator=_gen(6)).to(torch.float16)
    return {"INPUT__0": x}, {"OUTPUT__0": x * 0.5}


def _cumsum(v: int) -> tuple[Inputs, Inputs]:
    x = torch.tensor([1, 2, 3, 4])
    return {"INPUT__0": x}, {"OUTPUT__0": torch.tensor([1, 3, 6, 10])}


def _embedding(v: int) -> tuple[Inputs, Inputs]:
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [15, 14, 0, 0, 0, 0, 0, 0]])
    return {"token_ids": ids}, {"embeddings": ids.float().unsqueeze(-1) * torch.arange(1.0, 5.0)}


def _legacy(v: int) -> tuple[Inputs, Inputs]:
    x = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    return {"INPUT__0": x}, {"OUTPUT__0": x + v}


def _stats(v: int) -> tuple[Inputs, Inputs]:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    return {"INPUT__0": x}, {"mean": x.mean(dim=1, keepdim=True), "std": x.std(dim=1, keepdim=True)}


#: One recipe per model directory of the repository.
RECIPES: dict[str, Recipe] = {
    "resnet_classifier": Recipe(lambda v: ChannelMeans(), _resnet),
    "bert_embedder": Recipe(lambda v: Embedder(), _bert),
    "text_normalizer": Recipe(lambda v: Normalizer(), _text),
    "dict_ranker": Recipe(lambda v: DictRanker(), _dict, dict_input=True),
    "yolo_detector": Recipe(lambda v: Detector(), _yolo),
    "tabular_regressor": Recipe(RowSum, _tabular, versions=(1, 2, 3), served=(1, 2, 3)),
    "mnist_uint8": Recipe(lambda v: PixelMean(), _mnist),
    "scalar_affine": Recipe(lambda v: Affine(), _affine),
    "seq2seq_generator": Recipe(AddVersion, _seq2seq, versions=(1, 2, 3), served=(2, 3)),
    "custom_method": Recipe(lambda v: Predictor(), _custom),
    "optional_bias": Recipe(lambda v: OptionalBias(), _optional),
    "masked_bf16": Recipe(lambda v: MaskedSum(), _masked),
    "gpu_segmenter": Recipe(lambda v: Half(), _half, gpu=True),
    "multi_group": Recipe(lambda v: CumSum(), _cumsum),
    "token_embedding": Recipe(lambda v: TokenEmbedding(), _embedding),
    "legacy_noname": Recipe(AddVersion, _legacy, versions=(1, 2), served=(2,), ignored=("0", "03", "v3", "latest")),
    "two_stats": Recipe(lambda v: TwoStats(), _stats),
}


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` without torch's deprecation warning for ``torch.jit``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        return torch.jit.script(module)


def build(repo_dir: str | Path, *, cuda: bool | None = None) -> list[str]:
    """Write a matching TorchScript model into every model of a copy of the repository.

    Each model's file is written as ``<model>/<version>/<default_model_filename>`` for
    every version its recipe has, and into its ignored (non-version) directories.

    Args:
        repo_dir: a copy of :data:`REPOSITORY` (models needing CUDA may be removed).
        cuda: build the ``KIND_GPU`` models (default: when CUDA is available);
            False removes their directories so that the repository serves on a CPU.

    Returns:
        The names of the models built, sorted.

    Raises:
        KeyError: a model directory has no recipe here.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    built = []
    for model_dir in sorted(p for p in Path(repo_dir).iterdir() if (p / "config.pbtxt").is_file()):
        try:
            recipe = RECIPES[model_dir.name]
        except KeyError:
            raise KeyError(f"no recipe in tests/triton_models.py for model directory {model_dir.name!r}") from None
        if recipe.gpu and not cuda:
            shutil.rmtree(model_dir)
            continue
        cfg = parse((model_dir / "config.pbtxt").read_text(), str(model_dir / "config.pbtxt"), model_dir)
        filename = str(cfg.path)
        targets = [(str(v), v) for v in recipe.versions] + [(d, IGNORED_VERSION) for d in recipe.ignored]
        for directory, version in targets:
            (model_dir / directory).mkdir(exist_ok=True)
            module = script(recipe.make(version))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
                module.save(str(model_dir / directory / filename))
        built.append(model_dir.name)
    return built


def example(name: str, version: int | None = None) -> tuple[Inputs, Inputs]:
    """A request for model ``name`` and the outputs it must give.

    Args:
        name: the model.
        version: the version asked for (default: the highest served).
    """
    recipe = RECIPES[name]
    return recipe.example(max(recipe.served) if version is None else version)


def check(name: str, got: Inputs, expected: Inputs) -> None:
    """Assert that a response holds the expected outputs (tensors close, strings equal)."""
    assert set(got) >= set(expected), f"{name}: outputs {sorted(got)}, expected {sorted(expected)}"
    for key, want in expected.items():
        value = got[key]
        if isinstance(want, torch.Tensor):
            assert isinstance(value, torch.Tensor), f"{name}.{key}: {type(value).__name__}"
            torch.testing.assert_close(value.cpu(), want, msg=f"{name}.{key}: {value} != {want}")
        else:
            assert list(value) == list(want), f"{name}.{key}: {value!r} != {want!r}"
