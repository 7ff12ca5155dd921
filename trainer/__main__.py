"""``python -m trainer`` = the ``trainer`` console script."""

from trainer.cli import main

if __name__ == "__main__":
    main()
