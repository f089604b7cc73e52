"""The frozen-feature cache against running the vision tower (measured, CPU).

    pytest benchmarks/test_feature_cache.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from vlfast.data.shapes import ShapesDataset
from vlfast.models.vision import FeatureCache, tiny_vision_tower, tower_features

BATCH = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tower = tiny_vision_tower()
    data = ShapesDataset("train", BATCH)
    pixels = torch.stack([data[i].image for i in range(BATCH)]).float() / 127.5 - 1
    keys = [f"train/{i}/view0" for i in range(BATCH)]
    cache = FeatureCache(tmp_path_factory.mktemp("cache"), tower, {"size": 48})
    cache.features(keys, pixels)  # fill
    return tower, pixels, keys, cache


def test_tower(benchmark, setup):
    tower, pixels, _, _ = setup
    benchmark.group = f"image features of {BATCH} shapes scenes, CPU"
    features = benchmark(tower_features, tower, pixels)
    assert features.shape[0] == BATCH


def test_cache(benchmark, setup):
    tower, pixels, keys, cache = setup
    benchmark.group = f"image features of {BATCH} shapes scenes, CPU"
    features = benchmark(cache.features, keys, pixels)
    torch.testing.assert_close(features, tower_features(tower, pixels), atol=2e-3, rtol=2e-3)
    assert cache.misses == BATCH  # only the fill ran the tower
