"""The modules ``save_pruned`` copies into a saved folder, which ``from_pretrained(..., trust_remote_code=True)``
imports in a process that may not have sentinel-lightning installed.

They import only the standard library, torch, transformers and each other (relatively); ``tests/test_standalone.py``
checks it. ``families`` is the one family registry; ``pruned_modeling`` rebuilds a compacted model from its config.
"""
