"""The ``bnfold`` command line: a thin shell over the :mod:`bnfold` API.

Installed as ``bnfold.cli``; import it only under that name.
"""
