"""The evaluation corpus (bench/corpus.py) is deterministic for a seed, and the filters bench
prints its tables on it (no peers needed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _corpus_module():
    spec = importlib.util.spec_from_file_location("bench_corpus", ROOT / "bench" / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


README = """Example project
===============

The project reads documents and writes short summaries of each one for the team.
It keeps a small index on disk so that later runs only read what changed.

Installation
------------

- Install it with pip from the package index.
- Run the setup command once to create the index.
- Point it at a folder of documents and wait.

| option | default | meaning |
|---|---|---|
| workers | 4 | processes to use |
| cache | on | keep the index between runs |

```python
from example import Reader
reader = Reader("docs/")
print(reader.summary())
```

The summaries are plain text. Each one starts with the title of its document,
then gives the main points in a few sentences. Nothing is sent over the network.
"""


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 'install': a site-packages with a README, a licence, package metadata and a
    CSV, and a standard library with one module."""
    root = tmp_path_factory.mktemp("install")
    site, std = root / "site-packages", root / "stdlib"
    (site / "example").mkdir(parents=True)
    (site / "example" / "README.md").write_text(README)
    (site / "example-1.0.dist-info").mkdir()
    (site / "example-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: example\n\n" + README.replace("Example", "Another")
    )
    (site / "example-1.0.dist-info" / "LICENSE").write_text(
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
        "software, to deal in the software without restriction.\n\nThe software is provided "
        "as is, without warranty of any kind, express or implied, including merchantability.\n"
    )
    (site / "example" / "data.csv").write_text(
        "Year,Sales,Costs\n" + "\n".join(f"{2000 + k},{10 + k * 1.5},{7 + k}" for k in range(30))
    )
    std.mkdir()
    (std / "tool.py").write_text(
        '"""A tool."""\n\n\ndef add(a, b):\n    """Add two numbers."""\n    return a + b\n\n\n'
        'def sub(a, b):\n    """Subtract b from a."""\n    return a - b\n'
    )
    return site, std


def _build(corpus, install, seed: int) -> list[dict]:
    site, std = install
    sources = corpus.collect(seed, site, std, pydoc_modules=("textwrap",))
    return corpus.build(seed, clean=30, loops=21, short=10, sources=sources)


def test_corpus_is_deterministic_for_a_seed(install):
    corpus = _corpus_module()
    first, again = _build(corpus, install, 3), _build(corpus, install, 3)
    assert first == again
    assert first != _build(corpus, install, 4)
    sets = {r["set"] for r in first}
    assert sets == {"clean", "loop", "short"}
    kinds = {r["loop_kind"] for r in first if r["set"] == "loop"}
    assert kinds == set(corpus.LOOP_KINDS)  # every kind of loop is planted
    assert {r["domain"] for r in first} >= {"general", "programming", "chart", "ocr"}


def test_bench_prints_its_tables(install, tmp_path):
    corpus = _corpus_module()
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _build(corpus, install, 5)))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "filters.py"),
            "--corpus",
            str(path),
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| rule | loops caught | clean documents flagged | short answers flagged |" in out
    assert "| **curate, any rule** |" in out
    assert "| loops caught, by kind |" in out and "answers/s per core" in out
