import io
import json
import math
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vlfast.data.sources import SampleError, ShardSource, make_source, parse_data
from vlfast.data.stream import Stream, StreamLoader


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value % 256, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory, shards: int = 4, per_shard: int = 5) -> str:
    """shards x per_shard samples, keys SSSJJ, caption 'caption SSSJJ'; returns the brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(directory / f"{s:03d}.tar")) as sink:
            for j in range(per_shard):
                key = f"{s:03d}{j:02d}"
                sink.write({"__key__": key, "png": png(s * per_shard + j), "txt": f"caption {key}"})
    return f"{directory}/{{000..{shards - 1:03d}}}.tar"


def keys_of(loader) -> list[str]:
    return [key.rsplit("/", 1)[1] for batch in loader for key in batch["keys"]]


def loader(pattern, *, workers=0, batch_size=3, rank=0, world_size=1, **options) -> StreamLoader:
    stream = Stream([ShardSource(pattern, 16)], batch_size=batch_size, rank=rank, world_size=world_size, **options)
    return StreamLoader(stream, workers)


def test_parse_data(tmp_path):
    pattern = write_shards(tmp_path / "a", shards=3)
    (tmp_path / "coco").mkdir()
    specs = parse_data(f"wds:{pattern}=3,coco:{tmp_path}/coco=1")
    assert [(s.kind, s.ratio) for s in specs] == [("wds", 0.75), ("coco", 0.25)]
    assert [s.ratio for s in parse_data(f"shapes,wds:{tmp_path}/a/{{000,002}}.tar")] == [0.5, 0.5]
    errors = {
        f"wds:{pattern}=abc": "bad ratio 'abc'",
        f"wds:{pattern}=-1": "bad ratio '-1'",
        f"wds:{pattern}=0.5,shapes": "give a ratio to every source or to none",
        "coco:": "coco: needs a path",
        f"coco:{tmp_path}/nope": "no such directory",
        f"wds:{tmp_path}/b/{{0..9}}.tar": r"wds:.*/b/\{0..9\}.tar: no shard matches the pattern",
        f"wds:{tmp_path}/a/{{000..004}}.tar": "2 of its 5 shards are missing",
        "imagenet:x": "'imagenet:x' is not a source",
        "shapes,shapes": "listed twice",
    }
    for spec, message in errors.items():
        with pytest.raises(ValueError, match=r"--data .*" + message):
            parse_data(spec)


def test_reads_images_and_every_caption_format(tmp_path):
    captions = {"txt": b"a txt caption", "json": json.dumps({"caption": "a lavis caption"}).encode(),
                "list": json.dumps(["first of a list", "second"]).encode(),
                "vpgtrans": json.dumps({"all_captions": ["worse", "best"], "all_similarities": [0.1, 0.9]}).encode()}
    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        for i, (kind, data) in enumerate(captions.items()):
            sink.write({"__key__": kind, "jpg" if i % 2 else "png": png(i), "txt" if kind == "txt" else "json": data})
    batch = next(iter(loader(f"{tmp_path}/0.tar", batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["captions"] == ["a txt caption", "a lavis caption", "first of a list", "best"]
    assert [k.rsplit("/", 1)[1] for k in batch["keys"]] == list(captions)


def test_brace_patterns_with_ranges_and_alternatives(tmp_path):
    write_shards(tmp_path, shards=4, per_shard=2)
    keys = keys_of(loader(f"{tmp_path}/{{000,{{002..003}}}}.tar"))
    assert sorted(keys) == ["00000", "00001", "00200", "00201", "00300", "00301"]


def write_broken(tmp_path) -> str:
    """Shard 000: an unreadable image, a sample without caption, a caption of bad JSON; shard 001
    cut in the middle of its third sample."""
    with wds.TarWriter(str(tmp_path / "000.tar")) as sink:
        sink.write({"__key__": "good0", "png": png(1), "txt": "fine"})
        sink.write({"__key__": "badimage", "png": b"not an image", "txt": "broken"})
        sink.write({"__key__": "nocaption", "png": png(2)})
        sink.write({"__key__": "badjson", "png": png(3), "json": b"{not json"})
        sink.write({"__key__": "good1", "png": png(4), "txt": "fine too"})
    write_shards(tmp_path / "x", shards=1, per_shard=4)
    whole = (tmp_path / "x" / "000.tar").read_bytes()
    with tarfile.open(tmp_path / "x" / "000.tar") as tar:
        cut = tar.getmember("00002.png").offset_data + 20  # inside the third sample's image
    (tmp_path / "001.tar").write_bytes(whole[:cut])
    return f"{tmp_path}/{{000..001}}.tar"


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    pattern = write_broken(tmp_path)
    data = loader(pattern, batch_size=2)
    assert sorted(keys_of(data)) == ["00000", "00001", "good0", "good1"]
    # 001.tar: one tar error ends it, its cut third sample never forms
    assert data.skipped == {f"{tmp_path}/000.tar": 3, f"{tmp_path}/001.tar": 1}


def test_corrupt_samples_raise_naming_shard_and_key(tmp_path):
    pattern = write_broken(tmp_path)
    with pytest.raises(SampleError, match=r"shard .*/000.tar, sample 'badimage': undecodable image"):
        keys_of(loader(pattern, on_error="raise", seed=1))  # seed 1 reads 000.tar first
    with pytest.raises(SampleError, match=r"shard .*/001.tar, sample '\(tar stream\)': unreadable tar data"):
        keys_of(loader(f"{tmp_path}/001.tar", on_error="raise"))


@pytest.mark.parametrize("shards", [8, 3])  # 3 < 2 ranks x 2 workers: every slot reads every shard
def test_ranks_and_workers_read_every_sample_once_per_epoch(tmp_path, shards):
    pattern = write_shards(tmp_path, shards=shards, per_shard=5)
    everything = sorted(keys_of(loader(pattern)))
    assert len(everything) == shards * 5
    loaders = [loader(pattern, workers=2, rank=rank, world_size=2) for rank in range(2)]
    for _ in range(2):  # two epochs (passes)
        parts = [keys_of(one) for one in loaders]
        assert all(parts) and sorted(parts[0] + parts[1]) == everything


def test_endless_epochs_have_samples_per_epoch_and_continue(tmp_path):
    pattern = write_shards(tmp_path, shards=4, per_shard=5)
    data = loader(pattern, batch_size=4, samples_per_epoch=14, workers=2)
    first, second = keys_of(data), keys_of(data)
    assert len(data) == 4 and len(first) == len(second) == 14
    # the second epoch goes on with the 6 samples not read yet before the workers' second passes
    assert len(set(first)) == 14 and len(set(first + second)) == 20


def write_coco(root):
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 50 * i, dtype=np.uint8)).save(root / "train2017" / f"{i}.png")
    annotations = [{"image_id": i, "caption": f"coco {i}"} for i in range(3)]
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(3)]
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))


def mixture(tmp_path, workers=0, batch_size=5, samples=2000) -> StreamLoader:
    if not (tmp_path / "coco").exists():
        write_shards(tmp_path / "shards", shards=4, per_shard=5)
        write_coco(tmp_path / "coco")
    specs = parse_data(f"wds:{tmp_path}/shards/{{000..003}}.tar=0.5,shapes=0.3,coco:{tmp_path}/coco=0.2")
    sources = [make_source(spec, 16, images=10) for spec in specs]
    stream = Stream(sources, [s.ratio for s in specs], batch_size=batch_size, samples_per_epoch=samples, seed=3)
    return StreamLoader(stream, workers)


def test_mixture_ratios(tmp_path):
    keys = [key for batch in mixture(tmp_path, batch_size=50) for key in batch["keys"]]
    counts = {kind: sum(key.startswith(prefix) for key in keys)
              for kind, prefix in (("wds", str(tmp_path / "shards")), ("shapes", "shapes/"), ("coco", "coco/"))}
    assert sum(counts.values()) == len(keys) == 2000
    for kind, ratio in (("wds", 0.5), ("shapes", 0.3), ("coco", 0.2)):
        sd = math.sqrt(2000 * ratio * (1 - ratio))  # binomial: 22, 20 and 18 samples
        assert abs(counts[kind] - 2000 * ratio) < 4 * sd, (kind, counts)
    assert len({key for key in keys if key.startswith("coco/")}) == 3  # the finite sources cycle


def batches_of(data, epochs: int = 2) -> list[list[str]]:
    return [batch["keys"] for _ in range(epochs) for batch in data]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_mid_epoch_continues_with_the_samples_not_seen(tmp_path, workers):
    make = {"one pass": lambda: loader(write_shards(tmp_path / "one", shards=5, per_shard=7), workers=workers),
            "mixture": lambda: mixture(tmp_path, workers=workers, batch_size=4, samples=42)}
    for name, make_loader in make.items():
        whole = batches_of(make_loader())
        for stop in (1, 5, len(whole) // 2 + 3):
            interrupted = make_loader()
            seen = []
            for batch in interrupted:
                seen.append(batch["keys"])
                if len(seen) == stop:
                    break
            resumed = make_loader()  # a new process would build it the same way
            resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))  # as a checkpoint keeps it
            rest = []
            while resumed.epoch < 2:
                rest += [batch["keys"] for batch in resumed]
            assert seen + rest == whole, (name, stop)


def test_resume_refuses_a_changed_layout(tmp_path):
    pattern = write_shards(tmp_path, shards=2, per_shard=3)
    state = loader(pattern, workers=2).state_dict()
    with pytest.raises(ValueError, match="cannot resume: num_workers 2 -> 1"):
        loader(pattern, workers=1).load_state_dict(state)


MEMORY_SCRIPT = """
import resource, sys, torch
from vlfast.data.feature_shards import feature_shards
from vlfast.data.sources import ShardSource
from vlfast.data.stream import Stream, StreamLoader
from vlfast.models.vision import tiny_vision_tower
pattern, cache = sys.argv[1:]
images = StreamLoader(Stream([ShardSource(pattern, 128)], batch_size=32))
count = sum(len(batch["captions"]) for batch in images)
tower = tiny_vision_tower(layers=1)
cached = feature_shards(ShardSource(pattern, 48), tower, cache, batch_size=32, samples_per_shard=256)
features = StreamLoader(Stream([cached], batch_size=32))
assert sum(len(batch["captions"]) for batch in features) == count
print(count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_memory_stays_flat_when_the_data_grows_tenfold(tmp_path):
    """Streaming 3000 images at 128 x 128 (560 MiB as float32 tensors) and computing, writing and
    reading back their features (75 MiB as float32) takes no more memory than 300 images do, give
    or take 40 MiB."""
    def write(directory, count):
        directory.mkdir()
        with wds.ShardWriter(f"{directory}/%03d.tar", maxcount=200, verbose=0) as sink:
            for i in range(count):
                sink.write({"__key__": f"{i:06d}", "png": png(i), "txt": f"caption {i}"})
        return f"{directory}/{{000..{(count - 1) // 200:03d}}}.tar"

    peaks = {}
    for count in (300, 3000):
        pattern = write(tmp_path / str(count), count)
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, pattern, str(tmp_path / f"cache{count}")],
                             capture_output=True, text=True, check=True).stdout.split()
        assert int(out[0]) == count
        peaks[count] = int(out[1])
    assert peaks[3000] - peaks[300] < 40, peaks
