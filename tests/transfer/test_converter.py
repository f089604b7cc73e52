import pytest
import torch

from tests.data.test_coco_and_collate import word_tokenizer
from vlfast.transfer.converter import (
    cosine_loss,
    merge_projector,
    token_pairs,
    train_word_converter,
)


def test_converter_learns_a_linear_map_between_embedding_spaces():
    torch.manual_seed(0)
    source = torch.randn(300, 16)
    hidden_map = torch.randn(24, 16)
    target = source @ hidden_map.T + 0.01 * torch.randn(300, 24)
    pairs = torch.arange(300).repeat(2, 1).T  # every row with itself
    untrained = torch.nn.Linear(16, 24)
    converter = train_word_converter(source, target, pairs, epochs=8)
    assert cosine_loss(converter, source, target, pairs) < 0.02 < cosine_loss(untrained, source, target, pairs)


def test_merged_projector_equals_converter_after_projector():
    torch.manual_seed(0)
    projector, converter = torch.nn.Linear(12, 16), torch.nn.Linear(16, 24)
    merged = merge_projector(converter, projector)
    x = torch.randn(5, 7, 12)
    torch.testing.assert_close(merged(x), converter(projector(x)), atol=1e-5, rtol=1e-5)


class SplitTokenizer:
    """Splits 'circle' into two tokens: captions containing it tokenise to different lengths."""

    def __init__(self, base):
        self.base = base

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for word in text.split():
            ids += [100, 101] if word == "circle" else self.base(word, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids}


def test_token_pairs_within_and_across_tokenizers():
    tokenizer = word_tokenizer()
    same = token_pairs(tokenizer, tokenizer, ["a red circle", "the image", "a circle"])
    assert all(s == t for s, t in same.tolist()) and len(same) == 7  # every occurrence: 'a' and 'circle' twice
    across = token_pairs(tokenizer, SplitTokenizer(tokenizer), ["a red circle", "describe the image", "the red"])
    assert len(across) == 5  # the first caption has unequal lengths
    assert across.tolist() == [[tokenizer(w, add_special_tokens=False)["input_ids"][0]] * 2
                               for w in ["describe", "the", "image", "the", "red"]]
    with pytest.raises(ValueError, match="no token pairs"):
        token_pairs(tokenizer, SplitTokenizer(tokenizer), ["a circle"])
