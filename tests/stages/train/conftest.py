"""Fixtures of the train tests: a tokenizer trained on an in-file corpus (so golden curves do
not move when the demo corpus does), small real images, and tiny pack manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CORPUS = [
    "The chart shows sales rising in the third quarter.",
    "What color is the car in the image? The car is red.",
    "Describe the document: a letter with a table of numbers.",
    "def add(a, b):\n    return a + b",
    "The sum of 12 and 30 is 42, so the answer is 42.",
    "Image-1: a cat on a sofa. Image-2: a dog in a garden.",
    "Frame-1 shows a person walking; Frame-2 shows them running.",
] * 20

# (cols, rows) grids the tiny images are recorded at, and whether their dataset augments.
GRIDS = [(1, 1), (2, 1), (1, 2), (1, 1)]


@pytest.fixture(scope="session")
def train_tokenizer(tmp_path_factory) -> Path:
    from curate.demo.models import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("train_tok"), corpus=CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def token_ids(train_tokenizer):
    from transformers import AutoTokenizer

    from curate.stages.train.synthetic import TokenIds

    return TokenIds.from_tokenizer(AutoTokenizer.from_pretrained(train_tokenizer))


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> list[Path]:
    from curate.stages.train.synthetic import write_image

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("train_images")
    sizes = [(120, 90), (64, 96), (200, 60), (80, 80)]
    return [
        write_image(root / f"im{i}.{'png' if i % 2 else 'jpg'}", rng, w, h)
        for i, (w, h) in enumerate(sizes)
    ]


def make_tiny_packs(
    packs_dir: Path,
    token_ids,
    images: list[Path],
    *,
    n_packs: int = 4,
    seed: int = 0,
    augment: bool = True,
    max_images: int = 2,
) -> Path:
    """n_packs packs of 1-3 samples, each with 0..max_images images (several multi-image)."""
    from curate.stages.train.synthetic import image_entry, make_sample, write_packs

    rng = np.random.default_rng(seed)
    packs = []
    for p in range(n_packs):
        samples = []
        for s in range(1 + (p + 1) % 3):
            n_img = (p + s) % (max_images + 1)
            ims = [
                image_entry(
                    images[(p + s + k) % len(images)],
                    *GRIDS[(p + 2 * s + k) % len(GRIDS)],
                    data_augment=augment and (s + k) % 2 == 0,
                )
                for k in range(n_img)
            ]
            samples.append(
                make_sample(
                    rng,
                    token_ids,
                    prompt_tokens=int(rng.integers(4, 24)),
                    answer_tokens=int(rng.integers(2, 20)),
                    images=ims,
                )
            )
        packs.append(samples)
    return write_packs(packs, packs_dir, packs_per_shard=3)


@pytest.fixture
def tiny_run(tmp_path, token_ids, tiny_images) -> Path:
    """A run folder with 4 tiny packs in packs/ (two shards)."""
    make_tiny_packs(tmp_path / "run" / "packs", token_ids, tiny_images)
    return tmp_path / "run"
