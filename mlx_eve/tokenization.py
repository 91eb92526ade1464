"""Prompt → token ids, the way the reference does it (``tokenizer_image_token`` in EVEv*/eve/mm_utils.py).

The prompt is split at every ``<image>`` and each text chunk is tokenized on its own; only the first chunk
keeps its BOS. EVEv1 tokenizes with the slow SentencePiece ``LlamaTokenizer``, so every chunk after an image
starts with SentencePiece's word-boundary piece ("▁"): ``SentencePieceEncoder`` reproduces that tokenizer.
"""

import re
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import sentencepiece

from .models import IMAGE_TOKEN_ID
from .prompts import IMAGE_PLACEHOLDER

Encoder = Callable[[str], List[int]]


class SentencePieceEncoder:
    """transformers' slow ``LlamaTokenizer.__call__(text).input_ids``, on the checkpoint's ``tokenizer.model``.

    Special tokens written in the text (``</s>`` between turns) become their ids. Text after a special
    token is encoded with SentencePiece's leading "▁" in ``legacy`` mode (the default of the transformers
    releases EVEv1 was built with) and without it when ``tokenizer_config.json`` says ``"legacy": false``.
    """

    def __init__(
        self, model_file: Path, special_tokens: Dict[str, int], bos_id: int, add_bos: bool = True, legacy: bool = True
    ):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.special_tokens = special_tokens
        self.bos_id, self.add_bos, self.legacy = bos_id, add_bos, legacy
        by_length = sorted(special_tokens, key=len, reverse=True)
        self.splitter = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None
        # Non-legacy encoding of text that must not get a leading "▁": encode "<unk>" + text, drop <unk>'s pieces.
        self.unk_prefix = self.sp.id_to_piece(self.sp.unk_id())
        self.unk_length = len(self.sp.encode(self.unk_prefix))

    def __call__(self, text: str) -> List[int]:
        ids = [self.bos_id] if self.add_bos else []
        segments = self.splitter.split(text) if self.splitter else [text]
        for i, segment in enumerate(segments):
            if segment in self.special_tokens:
                ids.append(self.special_tokens[segment])
            elif segment:
                after_special = i > 0
                if self.legacy or not after_special:
                    ids += self.sp.encode(segment)
                else:
                    ids += self.sp.encode(self.unk_prefix + segment)[self.unk_length :]
        return ids


def tokenize_with_images(prompt: str, encode: Encoder, bos_id, image_token_counts: Sequence[int]) -> List[int]:
    """Token ids with the i-th ``<image>`` replaced by ``image_token_counts[i]`` image placeholder ids."""
    chunks = [encode(chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    if len(chunks) - 1 != len(image_token_counts):
        raise ValueError(f"{len(chunks) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(image_token_counts)} images.")
    keep_bos = bos_id is not None and chunks[0][:1] == [bos_id]
    ids = [bos_id] if keep_bos else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids += [IMAGE_TOKEN_ID] * image_token_counts[i - 1]
        ids += chunk[1:] if keep_bos else chunk
    return ids
