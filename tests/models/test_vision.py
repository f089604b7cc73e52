import torch

from vlfast.data.shapes import COLOURS, SHAPES, ShapesDataset
from vlfast.models.vision import fingerprint, tiny_vision_tower, tower_features


def pixels(scenes):
    return torch.stack([s.image for s in scenes]).float() / 127.5 - 1


def test_fingerprint_changes_with_the_preprocessing_and_the_tower():
    """What keeps the feature cache (vlfast.data.feature_shards) from reading stale features."""
    tower = tiny_vision_tower()
    first = fingerprint(tower, {"size": 48})
    assert fingerprint(tiny_vision_tower(), {"size": 48}) == first
    assert fingerprint(tower, {"size": 48, "flip": True}) != first
    assert fingerprint(tiny_vision_tower(seed=1), {"size": 48}) != first


def test_linear_probe_reads_shape_and_colour():
    """The frozen random tower's features carry the scene: a least-squares probe on the mean
    feature predicts the first object's colour and shape well above chance on held-out scenes."""
    tower = tiny_vision_tower()
    train, test = ShapesDataset("train", 600), ShapesDataset("val", 200)

    def data(dataset):
        scenes = [dataset[i] for i in range(len(dataset))]
        feats = tower_features(tower, pixels(scenes))
        x = torch.cat([feats.mean(1), feats[:, 1:].flatten(1)], 1)
        colours = torch.tensor([list(COLOURS).index(s.objects[0].colour) for s in scenes])
        shapes = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
        return x, colours, shapes

    x, colours, shapes = data(train)
    xt, colours_t, shapes_t = data(test)
    mean, std = x.mean(0), x.std(0) + 1e-6
    for target, target_t, classes in ((colours, colours_t, len(COLOURS)), (shapes, shapes_t, len(SHAPES))):
        onehot = torch.nn.functional.one_hot(target, classes).float()
        design = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1)
        weights = torch.linalg.lstsq(design, onehot, driver="gelsd").solution
        predicted = (torch.cat([(xt - mean) / std, torch.ones(len(xt), 1)], 1) @ weights).argmax(1)
        accuracy = (predicted == target_t).float().mean().item()
        assert accuracy > 2.0 / classes, (classes, accuracy)
