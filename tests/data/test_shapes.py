import re

import numpy as np
import pytest
import torch

from vlfast.data.shapes import COLOURS, ShapesDataset, make_scene, vocabulary


def test_deterministic_and_splits_differ():
    a, b = ShapesDataset("train", 20, seed=3), ShapesDataset("train", 20, seed=3)
    assert all(torch.equal(a[i].image, b[i].image) and a[i].captions == b[i].captions for i in range(20))
    val = ShapesDataset("val", 20, seed=3)
    assert sum(a[i].objects == val[i].objects for i in range(20)) < 5
    assert [s.objects for s in ShapesDataset("train", 20, seed=4)] != [s.objects for s in a]


def test_images_show_the_described_shapes():
    for i in range(30):
        scene = make_scene(np.random.default_rng(i))
        assert scene.image.shape == (3, 48, 48) and scene.image.dtype == torch.uint8
        assert 1 <= len(scene.objects) <= 3
        pixels = scene.image.permute(1, 2, 0).reshape(-1, 3)
        for obj in scene.objects:
            colour = torch.tensor(COLOURS[obj.colour], dtype=torch.uint8)
            assert (pixels == colour).all(-1).sum() >= 25  # the smallest shape covers more pixels
        assert len({o.position for o in scene.objects}) == len(scene.objects)


def test_captions_and_answers_use_the_vocabulary():
    words = set(vocabulary())
    for i in range(30):
        scene = make_scene(np.random.default_rng(i))
        texts = list(scene.captions) + [q for q, _ in scene.questions] + [a for _, a in scene.questions]
        for text in texts:
            assert set(re.findall(r"[a-z]+|:", text)) <= words, text
        assert len(set(scene.captions)) == len(scene.captions) >= 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesDataset("dev")
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset("train", 3)[3]
