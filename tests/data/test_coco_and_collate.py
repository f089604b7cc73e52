import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlfast.data.coco import CocoCaptions
from vlfast.data.collate import IGNORE_INDEX, CaptionCollator


def make_coco(root, broken: bool = False):
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
    images.append({"id": 3, "file_name": "missing.png"})
    (root / "images" / "bad.png").write_bytes(b"not an image")
    images.append({"id": 4, "file_name": "bad.png"})
    annotations = [{"image_id": i % 3, "caption": f"caption {i} "} for i in range(5)]
    if broken:
        annotations += [{"image_id": 3, "caption": "gone"}, {"image_id": 4, "caption": "bad"}]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root / "captions.json", root / "images"


def test_loads_resizes_and_normalises(tmp_path):
    data = CocoCaptions(*make_coco(tmp_path), image_size=32)
    assert len(data) == 5 and data.skipped == 0
    image, caption = data[4]
    assert image.shape == (3, 32, 32) and caption == "caption 4"
    assert not torch.equal(data[0][0], data[1][0])


def test_missing_and_unreadable_files(tmp_path):
    files = make_coco(tmp_path, broken=True)
    with pytest.raises(FileNotFoundError, match="missing.png: missing"):
        CocoCaptions(*files)
    data = CocoCaptions(*files, skip_missing=True)
    assert len(data) == 5 and data.skipped == 2
    with pytest.raises(FileNotFoundError, match="captions file .* not found"):
        CocoCaptions(tmp_path / "nope.json", tmp_path)


def word_tokenizer():
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "circle", "describe", "the", "image", ":"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def test_collate_masks_prompt_and_padding():
    collate = CaptionCollator(word_tokenizer(), prompt="describe the image :")
    batch = collate([(torch.zeros(3, 4, 4), "a red circle"), (torch.ones(3, 4, 4), "circle")])
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (2, 9)
    # <bos> describe the image : a red circle <eos>
    assert labels[0, :5].eq(IGNORE_INDEX).all() and labels[0, 5:].tolist() == ids[0, 5:].tolist()
    assert labels[1, 7:].eq(IGNORE_INDEX).all() and mask[1].tolist() == [1] * 7 + [0] * 2
    assert ids[1, 6].item() == 2  # eos ends the caption
