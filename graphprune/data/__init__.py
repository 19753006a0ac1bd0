"""Real input data for calibration and verification: npz files, image folders, text + tokenizer, feed dicts.

    data = load_data("texts.txt", model, tokenizer="tokenizer.json", max_length=256)   # or synthetic_data(model, 64)
    calibration, verification = data.split(128, 64, seed=0)
    for feed in verification.batches(8):
        session.run(None, feed)

A :class:`Dataset` holds samples WITHOUT the batch axis (so texts of different lengths can be mixed) and pads
them per batch when fed. Every problem with the user's data raises :class:`graphprune.errors.DataError` with a
one-line message naming the file, the input or the numbers. Pillow and ``tokenizers`` are imported only when an
image folder or a text file is loaded.
"""

from graphprune.data._dataset import Dataset, synthetic_data
from graphprune.data._images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD
from graphprune.data._loaders import load_data
from graphprune.data._text import load_tokenizer, read_texts

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "Dataset", "load_data", "load_tokenizer", "read_texts", "synthetic_data"]
