"""The EVE model families: one record each of everything that differs between them.

A family is one model file (a module with ``ModelArgs`` and ``Model``) plus one ``Family`` record,
registered here under its ``config.json`` ``model_type``. Loading, prompting, fine-tuning, conversion and
the app ask this table; nothing else branches on ``model_type``.
"""

import importlib
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple, Type

import mlx.nn as nn

from .errors import CheckpointError
from .image_processing import AnyPixelProcessor, AnyRatioProcessor, ImageProcessor
from .prompts import TEMPLATES, Template

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# The linears of one decoder layer, as LoRA keys. EVEv2's visual branch is the `moe_*` copy of each.
TEXT_LINEARS = tuple(f"self_attn.{n}" for n in ATTENTION) + tuple(f"mlp.{n}" for n in MLP)
VISUAL_LINEARS = tuple(f"self_attn.moe_{n}" for n in ATTENTION) + tuple(f"moe_mlp.{n}" for n in MLP)


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's "model_type"
    name: str  # what users call it
    module: str  # the model file: a module with `ModelArgs` and `Model`
    image_processor: Type[ImageProcessor]
    template: Template
    # `--targets` choice → LoRA keys inside each decoder layer; the first choice is the default.
    lora_targets: Mapping[str, Tuple[str, ...]]
    # Modules under `model.model` that turn pixels into embeddings: never quantized, optionally fully trained.
    patch_embedding: Tuple[str, ...]
    # The mlx-lm architecture its text decoder is (what a decode step runs; the benchmark's baseline).
    text_model: str

    def model_classes(self) -> Tuple[type, type]:
        """``(Model, ModelArgs)`` from the family's model file, imported on first use."""
        module = importlib.import_module(self.module)
        return module.Model, module.ModelArgs

    @property
    def default_targets(self) -> str:
        return next(iter(self.lora_targets))

    @property
    def patch_embedding_paths(self) -> Tuple[str, ...]:
        """Module paths from the model's root, e.g. ``model.vision_tower``."""
        return tuple(f"model.{name}" for name in self.patch_embedding)

    def is_patch_embedding(self, path: str) -> bool:
        """Whether a parameter or module path (``model.vision_tower.patch_embedding.0.weight``) belongs to it."""
        return any(path == p or path.startswith(p + ".") for p in self.patch_embedding_paths)

    def patch_embedding_modules(self, model: nn.Module) -> List[nn.Module]:
        modules = [model.model.get(name, []) for name in self.patch_embedding]
        return [m for module in modules for m in (module if isinstance(module, list) else [module])]


FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def family_of(model_type: str) -> Family:
    """The family of a ``model_type`` (a model's or a config's); ``CheckpointError`` for an unknown one."""
    if model_type not in FAMILIES:
        known = ", ".join(repr(k) for k in FAMILIES)
        raise CheckpointError(f"Unknown model_type {model_type!r} in config.json: mlx-eve supports {known}.")
    return FAMILIES[model_type]


register(
    Family(
        model_type="eve",
        name="EVEv1",
        module="mlx_eve.models.eve_llama",
        image_processor=AnyPixelProcessor,
        template=TEMPLATES["vicuna_v1"],
        lora_targets={"decoder": TEXT_LINEARS},
        patch_embedding=("vision_tower", "mm_projector"),
        text_model="llama",
    )
)
register(
    Family(
        model_type="eve-qwen2",
        name="EVEv2",
        module="mlx_eve.models.eve_qwen2",
        image_processor=AnyRatioProcessor,
        template=TEMPLATES["qwen2"],
        lora_targets={"both": TEXT_LINEARS + VISUAL_LINEARS, "text": TEXT_LINEARS, "visual": VISUAL_LINEARS},
        patch_embedding=("vision_tower",),
        text_model="qwen2",
    )
)
