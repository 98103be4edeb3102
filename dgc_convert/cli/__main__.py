"""``python -m dgc_convert.cli``: the same as the ``dgc-convert`` script."""

from dgc_convert.cli.app import main

main()
