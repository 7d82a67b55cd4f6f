"""The PyTorch front end: fold BatchNorm in ``nn.Module``, fx GraphModule and ExportedProgram.

``fold_torch`` captures the model as an fx graph (:mod:`.capture`), reads BN sites and their
guard facts from it (:mod:`.ops`, :mod:`.discover`), applies the exact folds with the shared
math core (:mod:`.rewrite`) and hands back a model with the same call signature (:mod:`.fold`).
``load_torch`` reads model files (:mod:`.load`).
"""

from bnfold.torchfold.fold import count_batchnorms, fold_file, fold_graph, fold_torch
from bnfold.torchfold.load import load_torch

__all__ = ["fold_torch", "fold_file", "fold_graph", "count_batchnorms", "load_torch"]
