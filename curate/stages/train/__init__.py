"""Train: the InternVL model on packed sequences (model, data, loss, loop, distributed).

``curate train --run DIR`` or ``torchrun --nproc-per-node N -m -- curate.cli.train --run DIR``
(the ``--`` keeps torchrun from reading ``--run`` as its own ``--run-path``).
"""
