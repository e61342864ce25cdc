"""``python -m curate.train`` (and ``torchrun ... -m curate.train``): the ``curate train`` command."""

import typer

from curate.train.cli import train_command

if __name__ == "__main__":
    typer.run(train_command)
