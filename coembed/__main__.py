"""``python -m coembed``, the ``coembed`` command (``torchrun ... -m coembed train RECIPE`` uses it)."""

from coembed.cli import main

main()
