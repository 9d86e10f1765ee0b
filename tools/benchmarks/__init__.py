"""The tables of tools/bench.py, one module each (``mask``, ``attention``, ``suffix``,
``compile_cost``, ``draft``) and what they share (``common``).

Not part of the installed package: tools/bench.py puts the repository root and tools/ on
``sys.path`` and imports these from a clone.
"""
