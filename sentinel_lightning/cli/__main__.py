"""``python -m sentinel_lightning.cli``: the same as the ``sentinel-lightning`` console script."""

from sentinel_lightning.cli import main

main()
