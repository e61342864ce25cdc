"""``python -m curate.train`` (also under ``torchrun ... -m curate.train``): ``curate train``."""

import typer

from curate.train.cli import train_command

if __name__ == "__main__":
    typer.run(train_command)
