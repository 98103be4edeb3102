"""Run the dgc-convert command line from a source checkout: ``python cli.py ...``."""

from dgc_convert.cli import main

if __name__ == "__main__":
    main()
