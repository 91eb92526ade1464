"""Prompt → token ids, the way the reference does it (``tokenizer_image_token`` in EVEv*/eve/mm_utils.py).

The prompt is split at every image and each text chunk is tokenized on its own; only the first chunk keeps its
BOS. EVEv1 tokenizes with the slow SentencePiece ``LlamaTokenizer``, so every chunk after an image starts with
SentencePiece's word-boundary piece ("▁"): ``SentencePieceEncoder`` reproduces that tokenizer.
"""

from pathlib import Path
from typing import Callable, Dict, List, Sequence

import sentencepiece

from .models import IMAGE_TOKEN_ID
from .prompts import IMAGE, Piece, Special

# Text → token ids, special tokens written in it encoded as text; ``after_special``: the text follows one.
Encoder = Callable[..., List[int]]


class SentencePieceEncoder:
    """transformers' slow ``LlamaTokenizer.__call__(text).input_ids``, on the checkpoint's ``tokenizer.model``, for
    text (special tokens are the template's ``Special`` pieces, ``tokenize`` adds them).

    Text after a special token (``</s>`` between turns) is encoded with SentencePiece's leading "▁" in ``legacy``
    mode (the default of the transformers releases EVEv1 was built with) and without it when
    ``tokenizer_config.json`` says ``"legacy": false``.
    """

    def __init__(self, model_file: Path, bos_id: int, add_bos: bool = True, legacy: bool = True):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.add_bos, self.legacy = bos_id, add_bos, legacy
        # Non-legacy encoding of text that must not get a leading "▁": encode "<unk>" + text, drop <unk>'s pieces.
        self.unk_prefix = self.sp.id_to_piece(self.sp.unk_id())
        self.unk_length = len(self.sp.encode(self.unk_prefix))

    def __call__(self, text: str, after_special: bool = False) -> List[int]:
        ids = [self.bos_id] if self.add_bos else []
        if self.legacy or not after_special:
            return ids + self.sp.encode(text)
        return ids + self.sp.encode(self.unk_prefix + text)[self.unk_length :]


def tokenize(
    pieces: Sequence[Piece], encode: Encoder, bos_id, special_ids: Dict[str, int], image_token_counts: Sequence[int]
) -> List[int]:
    """Token ids of a templated prompt: text encoded as text (a special token written in it is text), each
    ``Special`` piece as its id, the i-th ``IMAGE`` as ``image_token_counts[i]`` image placeholder ids."""
    chunks: List[List[Piece]] = [[]]
    for piece in pieces:
        if piece is IMAGE:
            chunks.append([])
        elif chunks[-1] and not isinstance(piece, Special) and type(chunks[-1][-1]) is str:
            chunks[-1][-1] += piece  # text is encoded whole between special tokens, as a tokenizer does
        else:
            chunks[-1].append(piece)
    if len(chunks) - 1 != len(image_token_counts):
        raise ValueError(f"{len(chunks) - 1} images in the prompt for {len(image_token_counts)} image token counts.")
    encoded = [_encode_chunk(chunk, encode, bos_id, special_ids) for chunk in chunks]
    keep_bos = bos_id is not None and encoded[0][:1] == [bos_id]
    ids = [bos_id] if keep_bos else []
    for i, chunk in enumerate(encoded):
        if i > 0:
            ids += [IMAGE_TOKEN_ID] * image_token_counts[i - 1]
        ids += chunk[1:] if keep_bos else chunk
    return ids


def _encode_chunk(chunk: Sequence[Piece], encode: Encoder, bos_id, special_ids: Dict[str, int]) -> List[int]:
    """The text between two images as the tokenizer encodes it: a BOS first (if it adds one), each special token as
    its id, and the text after one as the tokenizer encodes text there."""
    ids: List[int] = []
    for i, piece in enumerate(chunk):
        if isinstance(piece, Special):
            ids.append(special_ids[piece])
            continue
        encoded = encode(piece, after_special=i > 0)
        ids += encoded[1:] if i > 0 and bos_id is not None and encoded[:1] == [bos_id] else encoded
    if not chunk:
        ids = encode("")
    return ids
