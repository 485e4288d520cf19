import numpy as np
import pytest
import torch
from PIL import Image

from memrl.config import load_config
from memrl.data import DataError, ImageSet, load_folder, load_npz, load_splits


def test_bundled_splits_are_disjoint_seeded_and_duplicated(cfg):
    s = load_splits(cfg.data)
    assert len(s.private) == cfg.data.private_size and len(s.heldout) == cfg.data.heldout_size
    assert s.private.images.min() >= -1 and s.private.images.max() <= 1
    assert s.private.images.shape[1:] == (1, 8, 8)
    assert s.heldout.images.shape[1:] == (1, 8, 8) and s.heldout.labels is not None
    assert len(s.canary_index) == cfg.data.canaries and s.canary_index.max() < cfg.data.private_size
    ft = s.finetune_set()
    assert len(ft) == cfg.data.private_size + cfg.data.canaries * (cfg.data.duplication - 1)
    # every canary appears exactly `duplication` times
    for i in s.canary_index:
        hits = (ft.images == s.private.images[i]).flatten(1).all(1).sum()
        assert hits == cfg.data.duplication
    # private and held-out do not share images (and neither is empty)
    d = torch.cdist(s.private.images.flatten(1), s.heldout.images.flatten(1))
    assert d.numel() == cfg.data.private_size * cfg.data.heldout_size and (d > 0).all()
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


def test_a_shift_moves_the_task_images_and_leaves_the_base_alone(cfg):
    plain = load_splits(cfg.data)
    cfg.data.shift = "invert"
    inverted = load_splits(cfg.data)
    assert torch.equal(inverted.private.images, -plain.private.images)
    assert torch.equal(inverted.heldout.images, -plain.heldout.images)
    assert torch.equal(inverted.base.images, plain.base.images) and torch.equal(
        inverted.canary_index, plain.canary_index
    )
    assert inverted.fingerprint != plain.fingerprint
    cfg.data.shift = "rot90"
    assert torch.equal(load_splits(cfg.data).private.images, torch.rot90(plain.private.images, 1, (2, 3)))
    cfg.data.shift = "blur"
    with pytest.raises(DataError, match="data.shift='blur' is not a shift; choose one of invert, rot90"):
        load_splits(cfg.data)


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


def test_every_bundled_dataset_loads_offline_as_greyscale_in_range():
    from memrl.data import BUNDLED, bundled
    from memrl.data.bundled import SOURCES

    sizes = {
        **{"mnist": 5000, "digits": 1797, "faces": 100, "histology": 256, "retina": 804, "cells": 340},
        **{"nonfaces": 100, "camera": 319, "astronaut": 418, "coffee": 380, "rocket": 224, "moon": 337},
        **{"chelsea": 496, "coins": 432, "page": 235, "text": 280, "hubble": 837, "photos": 677},
        **{"fashion": 6000, "animals": 2000},
    }
    assert set(BUNDLED) == set(sizes) == set(SOURCES)
    for name in BUNDLED:
        s = bundled(name, 16)
        assert s.images.shape == (sizes[name], 1, 16, 16), name
        assert s.images.min() >= -1 and s.images.max() <= 1 and s.images.std() > 0.1, name
        assert (s.labels is not None) == (name in ("mnist", "digits", "fashion", "animals")), name
        if name not in ("mnist", "digits", "faces", "histology", "retina", "cells"):  # the suite v2 sources
            assert (s.images.flatten(1).std(dim=1) > 0).all(), name  # no flat patch: no duplicate blanks
    assert bundled("faces", 16, channels=3).images.shape[1] == 3


def test_every_suite_task_reads_a_bundled_source():
    """The suite uses only the bundled sources listed in ``SOURCES`` (nothing else is read)."""
    import importlib

    from memrl.task import suite

    module = importlib.import_module("memrl.data.bundled")
    assert all(e.cfg.data.source in module.SOURCES for e in suite(load_config("bench")))


def test_a_loaded_set_has_one_fingerprint_whatever_cpu_kernels_torch_runs():
    """torch's default, AVX2 and AVX-512 resize kernels round differently (histology's patches,
    resized from 32 to 16 px, came out with other fingerprints): a loaded set hashes its pixels as
    read, so stored evaluations are found on every CPU."""
    import os
    import subprocess
    import sys

    from memrl.data import bundled

    code = "from memrl.data import bundled; print(bundled('histology', 16).fingerprint)"
    other = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert other == bundled("histology", 16).fingerprint


def test_a_loaded_set_is_fingerprinted_by_its_source_pixels_not_by_the_resize(tmp_path, monkeypatch):
    import importlib

    imageset = importlib.import_module("memrl.data.imageset")
    pixels = np.random.default_rng(0).integers(0, 256, (12, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=pixels)
    before = load_npz(tmp_path / "a.npz", 16)
    resize = imageset.resize_images
    monkeypatch.setattr(imageset, "resize_images", lambda x, r: resize(x, r) * (1 - 1e-6))
    assert load_npz(tmp_path / "a.npz", 16).fingerprint == before.fingerprint
    assert load_npz(tmp_path / "a.npz", 8).fingerprint != before.fingerprint
    pixels[3, 5, 7] ^= 1
    np.savez(tmp_path / "a.npz", images=pixels)
    assert load_npz(tmp_path / "a.npz", 16).fingerprint != before.fingerprint
    assert before.subset([0, 1]).fingerprint != before.subset([0, 2]).fingerprint


def test_the_fingerprint_is_of_16_bit_pixels(cfg):
    """A set built by hand: last-bit float differences do not change it; real edits do."""
    s = load_splits(cfg.data).private
    grid = ((s.images + 1) * 32767.5).round() / 32767.5 - 1  # values on the 16-bit grid
    on_grid = ImageSet(grid, s.labels, None, s.name, s.meta)
    jitter = 1e-7 * torch.randn_like(grid).sign() * (grid.abs() < 0.99)
    assert ImageSet(grid + jitter, s.labels, None, s.name, s.meta).fingerprint == on_grid.fingerprint
    edited = grid.clone()
    edited[0, 0, 0, 0] += 2 / 32767.5
    assert ImageSet(edited, s.labels, None, s.name, s.meta).fingerprint != on_grid.fingerprint


def test_sixteen_bit_pngs_keep_their_range(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    s = load_folder(tmp_path, resolution=8)
    assert s.images.min() == pytest.approx(-1) and s.images.max() == pytest.approx(1)
    assert (s.images == 1).float().mean() < 0.05  # not clipped to white


def test_npz_pixels_are_scaled_by_type_and_bad_values_refused(tmp_path):
    ramp = np.linspace(0, 1, 64).reshape(1, 8, 8).repeat(10, 0)
    for name, array in {
        "u8": (ramp * 255).astype(np.uint8),
        "u16": (ramp * 65535).astype(np.uint16),
        "f32": ramp.astype(np.float32),
    }.items():
        np.savez(tmp_path / f"{name}.npz", images=array)
        s = load_npz(tmp_path / f"{name}.npz", 8)
        assert s.images.min() == pytest.approx(-1, abs=1e-3) and s.images.max() == pytest.approx(
            1, abs=1e-3
        ), name
    bad = {
        "nan": (ramp.copy(), "NaN or infinite"),
        "big": (ramp * 255.0, r"must lie in \[0, 1\]"),
        "int64": ((ramp * 255).astype(np.int64), "type int64 are not supported"),
        "text": (np.array([["a"] * 8] * 8)[None].repeat(10, 0), "not supported"),
        "flat": (np.zeros((10, 0, 8), np.uint8), "non-empty"),
    }
    bad["nan"][0][0, 0, 0] = np.nan
    for name, (array, message) in bad.items():
        np.savez(tmp_path / f"{name}.npz", images=array)
        with pytest.raises(DataError, match=message):
            load_npz(tmp_path / f"{name}.npz", 8)
    np.savez(tmp_path / "inf.npz", images=np.where(ramp > 0.5, np.inf, ramp))
    with pytest.raises(DataError, match="NaN or infinite"):
        load_npz(tmp_path / "inf.npz", 8)


def test_npz_shape_problems_are_named(tmp_path):
    rgb_last = np.zeros((10, 28, 28, 3), np.uint8)
    np.savez(tmp_path / "last.npz", images=rgb_last)
    assert load_npz(tmp_path / "last.npz", 8).images.shape == (10, 3, 8, 8)
    np.savez(tmp_path / "odd.npz", images=np.zeros((10, 5, 8, 8), np.uint8))
    with pytest.raises(DataError, match="5 channels"):
        load_npz(tmp_path / "odd.npz", 8)
    np.save(tmp_path / "single.npy", np.zeros((10, 8, 8), np.uint8))
    (tmp_path / "single.npy").rename(tmp_path / "renamed.npz")
    with pytest.raises(DataError, match="single .npy array"):
        load_npz(tmp_path / "renamed.npz", 8)


def test_captions_in_other_encodings_are_explained(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_bytes("file,caption\na.png,caf\u00e9\n".encode("utf-8-sig"))
    assert load_folder(tmp_path, 8).captions == ["caf\u00e9"]
    (tmp_path / "captions.csv").write_bytes("file,caption\na.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_folder(tmp_path, 8)
    (tmp_path / "captions.csv").write_bytes("file,caption\na.png,x\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        load_folder(tmp_path, 8)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    import zlib

    # a 20000 x 20000 greyscale PNG of a few hundred kB: decoding it would take 400 MB
    width = height = 20000
    raw = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height)), 9)

    def chunk(kind, data):
        import struct

        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    import struct

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(DataError, match="bomb|more than memrl reads"):
        load_folder(tmp_path, 8)


def test_small_datasets_get_splits_sized_from_the_data(cfg):
    import dataclasses

    from memrl.data import fit_sizes

    sized = fit_sizes(dataclasses.replace(cfg.data, private_size=64, heldout_size=128, canaries=4), 16)
    assert (sized.private_size, sized.heldout_size, sized.canaries) == (12, 4, 1)
    with pytest.raises(DataError, match="at least 8"):
        fit_sizes(cfg.data, 7)


def test_a_garbage_or_pickled_npz_is_explained_without_numpy_hints(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"not an archive at all")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    (tmp_path / "objects.npy").rename(tmp_path / "objects.npz")
    for name, reason in (("garbage", "not a numpy archive"), ("objects", "holds Python objects")):
        with pytest.raises(DataError, match=reason) as err:
            load_npz(tmp_path / f"{name}.npz", 8)
        assert "allow_pickle" not in str(err.value) and "unsafely" not in str(err.value)
