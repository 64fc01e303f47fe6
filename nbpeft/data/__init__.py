"""Training data in: the forms people have it in, conversations, batches and packing, the example view, new tokens."""

from .batches import (
           IGNORE,
           PAD_MULTIPLE,
           Batches,
           MissingTokenizer,
           collate,
           collate_packed,
           kind_of,
           pack,
           tokenizer_for,
)

__all__ = ["IGNORE", "PAD_MULTIPLE", "Batches", "MissingTokenizer", "collate", "collate_packed", "kind_of", "pack",
           "tokenizer_for"]
