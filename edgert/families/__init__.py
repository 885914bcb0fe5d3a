"""Model families, one package each, and the registry that maps names and formats to them.

Each family's folder holds its config and `nn.Module` (``model.py``), its loaders, its build
(``build.py``, the compile side) and its runtime task or the shared one it uses; `registry`
is the one table. Importing this package imports nothing else.
"""
