"""`python -m mayfly`: the mayfly command."""

from mayfly.cli import main

if __name__ == "__main__":
    main()
