"""`python -m fgscope` runs the CLI."""

from fgscope.cli import main

if __name__ == "__main__":
    main()
