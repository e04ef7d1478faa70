"""The models the tasks share, built from torch.nn layers (``--fused`` converts them):

- ``Seq2Seq``: an encoder-decoder over symbols (the copy task);
- ``SequenceClassifier``: a recurrent stack read to the end, then a linear layer;
- ``LanguageModel``: embedding, recurrent stack, linear read-out (optionally tied).
"""
from .classifier import SequenceClassifier
from .language import LanguageModel
from .seq2seq import PAD, Seq2Seq

__all__ = ["PAD", "LanguageModel", "Seq2Seq", "SequenceClassifier"]
