"""The processor: question(s) + images → templated prompt, token ids with expanded image placeholders, pixels."""

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer
from PIL import Image
from transformers.utils import logging as hf_logging

from .errors import CheckpointError, PromptError, PromptTooLongError
from .image import ImageInput, open_image
from .image_processing import ImageProcessor
from .prompts import (
    Piece,
    Prompt,
    RawPrompt,
    Template,
    check_system,
    check_turns,
    place_images,
    raw_pieces,
    render,
    to_messages,
)
from .tokenization import Encoder, SentencePieceEncoder, tokenize

# What a model folder holds besides weights and config.json, copied along when a model is saved.
PROCESSOR_FILES = [
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
]


@dataclass
class ModelInputs:
    input_ids: mx.array  # (L,) int32; each image is a run of IMAGE_TOKEN_ID, one per image embedding
    images: List[Image.Image]
    image_processor: Optional[ImageProcessor]
    image_tokens: int
    prompt: str  # the templated text, with <image> placeholders
    _pixel_values: Optional[List[mx.array]] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_pixels(cls, input_ids: mx.array, pixel_values: List[mx.array], image_tokens: int) -> "ModelInputs":
        """Inputs whose images came as pixels already computed (on a rank that never saw the images)."""
        return cls(input_ids, [], None, image_tokens, "", pixel_values)

    @property
    def pixel_values(self) -> List[mx.array]:
        """One normalised (H, W, 3) float32 array per image, computed when first needed."""
        if self._pixel_values is None:
            self._pixel_values = [mx.array(self.image_processor(image)) for image in self.images]
        return self._pixel_values


class Processor:
    def __init__(
        self,
        tokenizer: TokenizerWrapper,
        image_processor: ImageProcessor,
        template: Template,
        encode: Encoder,
        context_length: int,
        source_path: Optional[Path] = None,
    ):
        self.source_path = source_path
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.encode = encode
        self.context_length = context_length
        hf = tokenizer._tokenizer
        # Every special token's id: the template's pieces, and what a raw prompt may write.
        self.special_ids = {t: hf.convert_tokens_to_ids(t) for t in hf.all_special_tokens} | hf.get_added_vocab()

    @classmethod
    def from_pretrained(
        cls, model_path: Path, config: dict, image_processor: ImageProcessor, template: Template
    ) -> "Processor":
        tokenizer = read_tokenizer(model_path)
        hf = tokenizer._tokenizer
        stop_ids = {hf.convert_tokens_to_ids(t) for t in template.stop_tokens if t in hf.get_vocab()}
        generation_config = model_path / "generation_config.json"
        if generation_config.exists():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            stop_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tokenizer.eos_token_ids = stop_ids | set(tokenizer.eos_token_ids)
        return cls(
            tokenizer,
            image_processor,
            template,
            _make_encoder(model_path, hf),
            config.get("max_position_embeddings") or 4096,
            model_path,
        )

    def save_pretrained(self, folder: Path) -> None:
        copy_processor_files(self.source_path, folder, self.image_processor)

    def format(
        self, prompt: Prompt, num_images: int = 0, system_prompt: Optional[str] = None, answer: bool = True
    ) -> str:
        """The templated prompt text, ``<image>`` placeholders included (``pieces``, rendered)."""
        return render(self.pieces(prompt, num_images, system_prompt, answer))

    def pieces(
        self, prompt: Prompt, num_images: int = 0, system_prompt: Optional[str] = None, answer: bool = True
    ) -> List[Piece]:
        """The templated prompt as pieces (``prompts.py``). With ``answer`` (generation) the conversation must end
        with the user; without it (training) it ends with the assistant. A ``RawPrompt`` is its text as it is, its
        special tokens and ``<image>`` placeholders included."""
        if isinstance(prompt, RawPrompt):
            return raw_pieces(prompt, self.special_ids)
        messages, system = to_messages(prompt)
        check_turns(messages)
        if answer and messages[-1]["role"] != "user":
            raise PromptError("The conversation must end with a user message for the model to answer.")
        if system_prompt is not None:
            check_system(system_prompt)
        return self.template.pieces(place_images(messages, num_images), system_prompt or system)

    def tokenize(self, pieces: Sequence[Piece], image_token_counts: Sequence[int]) -> List[int]:
        """Token ids of templated ``pieces`` whose images take ``image_token_counts`` tokens each."""
        return tokenize(pieces, self.encode, self.tokenizer.bos_token_id, self.special_ids, image_token_counts)

    def __call__(
        self,
        prompt: Prompt,
        images: Union[None, ImageInput, Sequence[ImageInput]] = None,
        system_prompt: Optional[str] = None,
        max_size: Optional[int] = None,
    ) -> ModelInputs:
        """``prompt``: the user's question, or a list of ``{"role", "content"}`` messages (multi-turn).
        ``max_size``: EVEv2 image resolution for this prompt. Pixels are only computed if asked for."""
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        images = [open_image(image) for image in images]  # headers only: sizes, no pixels yet
        image_processor = self.image_processor.with_max_size(max_size)
        pieces = self.pieces(prompt, len(images), system_prompt)
        text = render(pieces)
        try:
            text.encode()
        except UnicodeEncodeError as e:
            raise PromptError(f"The prompt has a lone surrogate ({text[e.start]!r}), which is not Unicode text.") from e
        counts = [image_processor.num_tokens(*image.size) for image in images]
        ids = self.tokenize(pieces, counts)
        if len(ids) >= self.context_length:
            raise PromptTooLongError(
                f"The prompt is {len(ids)} tokens ({sum(counts)} of them for {len(images)} image(s)), but the "
                f"model's context is {self.context_length} tokens. Shorten the text, use fewer images"
                + (" or a smaller --max-size." if hasattr(image_processor, "max_size") else ".")
            )
        # Decoded only now that the prompt fits, one at a time, the largest reduced as they are read.
        images = [image.decode(image_processor.target_size) for image in images]
        return ModelInputs(mx.array(ids, dtype=mx.int32), images, image_processor, sum(counts), text)


def copy_processor_files(source: Path, folder: Path, image_processor: ImageProcessor) -> None:
    """Tokenizer and generation files from ``source``; the image processor's settings as resolved."""
    for name in PROCESSOR_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor.to_dict(), indent=2))


TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "vocab.json"]


def read_tokenizer(model_path: Path) -> TokenizerWrapper:
    """The model folder's tokenizer; ``CheckpointError`` when it has none or it cannot be read."""
    if not any((model_path / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{model_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files "
            "of the original checkpoint into it."
        )
    try:
        tokenizer = _quietly(load_tokenizer, model_path)
    except Exception as e:  # transformers raises many kinds, some misleading ("install sentencepiece")
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"The tokenizer in {model_path} could not be read: {detail}") from e
    if not (model_path / "tokenizer.json").exists() and (model_path / "tokenizer.model").exists():
        # mlx-lm picks its SentencePiece detokenizer from tokenizer.json alone. Without it (EVEv1 as released), its
        # fallback decodes the answer so far at each token, and SentencePiece drops a character before an
        # incomplete one made of byte pieces, which that fallback then repeats.
        tokenizer._detokenizer = SPMStreamingDetokenizer(tokenizer._tokenizer)
    return tokenizer


def _quietly(fn, *args):
    """transformers warns that an ``eve`` config is not one of its model types; it only needs the tokenizer."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return fn(*args)
    finally:
        hf_logging.set_verbosity(level)


def _make_encoder(model_path: Path, hf_tokenizer) -> Encoder:
    """EVEv1 (a SentencePiece ``tokenizer.model``) is encoded like the reference's slow tokenizer."""
    sp_model = model_path / "tokenizer.model"
    if not sp_model.exists():
        return lambda text, after_special=False: hf_tokenizer.encode(text, split_special_tokens=True)
    config_file = model_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    return SentencePieceEncoder(
        sp_model,
        bos_id=hf_tokenizer.bos_token_id,
        add_bos=config.get("add_bos_token", True),
        legacy=config.get("legacy", True) is not False,
    )
