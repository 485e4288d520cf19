import numpy as np
import pytest
import torch
from PIL import Image

from memrl.data import DataError, ImageSet, load_folder, load_npz, load_splits


def test_bundled_splits_are_disjoint_seeded_and_duplicated(cfg):
    s = load_splits(cfg.data)
    assert len(s.private) == cfg.data.private_size and len(s.heldout) == cfg.data.heldout_size
    assert s.private.images.min() >= -1 and s.private.images.max() <= 1
    assert s.private.images.shape[1:] == (1, 8, 8)
    ft = s.finetune_set()
    assert len(ft) == cfg.data.private_size + cfg.data.canaries * (cfg.data.duplication - 1)
    # every canary appears exactly `duplication` times
    for i in s.canary_index:
        hits = (ft.images == s.private.images[i]).flatten(1).all(1).sum()
        assert hits == cfg.data.duplication
    # private and held-out do not share images
    d = torch.cdist(s.private.images.flatten(1), s.heldout.images.flatten(1))
    assert (d > 0).all()
    assert load_splits(cfg.data).fingerprint == s.fingerprint


def test_fingerprint_changes_with_pixels_labels_and_seed(cfg):
    s = load_splits(cfg.data)
    p = s.private
    changed = p.images.clone()
    changed[0, 0, 0, 0] += 0.01
    assert ImageSet(changed, p.labels, None, p.name, p.meta).fingerprint != p.fingerprint
    assert ImageSet(p.images, p.labels.flip(0), None, p.name, p.meta).fingerprint != p.fingerprint
    cfg.data.seed = 5
    assert load_splits(cfg.data).fingerprint != s.fingerprint


def test_private_classes_filter(cfg):
    cfg.data.private_classes = [3, 7]
    s = load_splits(cfg.data)
    assert set(s.private.labels.tolist()) <= {3, 7}


def _png(path, value=128, size=10):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_folder_with_classes_and_captions(tmp_path):
    _png(tmp_path / "cats" / "a.png", 0)
    _png(tmp_path / "dogs" / "b.png", 255)
    (tmp_path / "captions.csv").write_text("file,caption\ncats/a.png,a black square\n")
    s = load_folder(tmp_path, resolution=8)
    assert s.images.shape == (2, 1, 8, 8)
    assert s.labels.tolist() == [0, 1]
    assert s.captions == ["a black square", ""]
    assert torch.allclose(s.images[0], torch.tensor(-1.0)) and torch.allclose(s.images[1], torch.tensor(1.0))


def test_folder_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        load_folder(tmp_path, 8)
    _png(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("file,caption\nghost.png,boo\n")
    with pytest.raises(DataError, match=r"captions\.csv, line 2: caption for 'ghost\.png'"):
        load_folder(tmp_path, 8)
    (tmp_path / "captions.csv").unlink()
    good = (tmp_path / "a.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"broken\.png: cannot read this image"):
        load_folder(tmp_path, 8)
    (tmp_path / "broken.png").unlink()
    _png(tmp_path / "big.png", size=12)
    with pytest.raises(DataError, match=r"data\.resize=true"):
        load_folder(tmp_path, 10, resize=False)


def test_npz_source(tmp_path, cfg):
    images = np.random.default_rng(0).integers(0, 256, (300, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(300) % 10)
    s = load_npz(tmp_path / "set.npz", 8)
    assert s.images.shape == (300, 1, 8, 8) and s.labels[:3].tolist() == [0, 1, 2]
    cfg.data.source = str(tmp_path / "set.npz")
    splits = load_splits(cfg.data)
    assert len(splits.private) == cfg.data.private_size
    np.savez(tmp_path / "wrong.npz", pictures=images)
    with pytest.raises(DataError, match="no array named 'images'"):
        load_npz(tmp_path / "wrong.npz", 8)


def test_too_few_images_is_explained(tmp_path, cfg):
    np.savez(tmp_path / "small.npz", images=np.zeros((5, 8, 8), np.uint8))
    cfg.data.source = str(tmp_path / "small.npz")
    with pytest.raises(DataError, match="5 usable images"):
        load_splits(cfg.data)
