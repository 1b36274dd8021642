"""Verification .bin files: round trip, the layouts found in the wild, and pickles that are not data."""
from __future__ import annotations

import builtins
import os
import pickle

import numpy as np
import pytest
import torch

from data_helpers import smooth_image
from facerec.data import BinVerificationSet, read_bin, write_bin
from facerec.data.decode import normalise


@pytest.fixture(scope="module")
def jpegs():
    import simplejpeg

    rng = np.random.default_rng(1)
    return [simplejpeg.encode_jpeg(smooth_image(rng), quality=90) for _ in range(8)]


def test_round_trip_and_verification_set(jpegs, tmp_path):
    issame = [True, False, True, False]
    write_bin(tmp_path / "lfw.bin", jpegs, issame)
    images, read_issame = read_bin(tmp_path / "lfw.bin")
    assert images == jpegs and read_issame.tolist() == issame
    dataset = BinVerificationSet(tmp_path / "lfw.bin")
    assert dataset.name == "lfw" and len(dataset) == 8
    assert dataset.pairs.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    import simplejpeg

    image, index = dataset[5]
    assert index == 5 and torch.equal(image, normalise(simplejpeg.decode_jpeg(jpegs[5], colorspace="RGB")))


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_images_and_labels_and_old_protocols_load(jpegs, tmp_path, protocol):
    # Files in the wild: protocol 2 (bytes pickled through _codecs.encode), images as uint8 arrays,
    # issame as a numpy bool array.
    content = ([np.frombuffer(j, dtype=np.uint8) for j in jpegs[:4]], np.array([True, False]))
    (tmp_path / "x.bin").write_bytes(pickle.dumps(content, protocol=protocol))
    images, issame = read_bin(tmp_path / "x.bin")
    assert images == jpegs[:4] and issame.tolist() == [True, False]
    (tmp_path / "y.bin").write_bytes(pickle.dumps((jpegs[:2], [np.bool_(True)]), protocol=protocol))
    assert read_bin(tmp_path / "y.bin")[1].tolist() == [True]


def test_python2_pickle_loads_str_as_bytes(tmp_path):
    # The released .bin files were pickled by Python 2: images are py2 str (SHORT_BINSTRING opcodes).
    python2_pickle = b"\x80\x02(](U\x02abU\x02cde]\x88at."  # ([str "ab", str "cd"], [True])
    (tmp_path / "py2.bin").write_bytes(python2_pickle)
    images, issame = read_bin(tmp_path / "py2.bin")
    assert images == [b"ab", b"cd"] and issame.tolist() == [True]


class CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (str(self.path), "w"))


class RunsCommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [CreatesFile, RunsCommand])
def test_malicious_pickle_is_refused_and_runs_nothing(payload, tmp_path):
    target = tmp_path / "pwned"
    crafted = pickle.dumps(([b"a", b"b"], [payload(target)]))
    assert not target.exists()
    (tmp_path / "evil.bin").write_bytes(crafted)
    with pytest.raises(pickle.UnpicklingError, match=r"evil.bin: refusing to load (io|posix|os)\.(open|system)"):
        read_bin(tmp_path / "evil.bin")
    assert not target.exists()
    pickle.loads(crafted)  # the same bytes through plain pickle do run the payload: the check above is real
    assert target.exists()


def test_codecs_encode_only_decodes_latin1(tmp_path):
    import _codecs

    class Rot13:
        def __reduce__(self):
            return (_codecs.encode, ("data", "rot13"))

    (tmp_path / "x.bin").write_bytes(pickle.dumps(([Rot13(), b"b"], [True]), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing _codecs.encode"):
        read_bin(tmp_path / "x.bin")


def test_malformed_bins_fail_clearly(jpegs, tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps((jpegs[:3], [True, False])))
    with pytest.raises(ValueError, match="3 images but 2 issame labels.*expected 4 images"):
        read_bin(path)
    path.write_bytes(pickle.dumps({"images": jpegs}))
    with pytest.raises(ValueError, match="expected a pickled pair"):
        read_bin(path)
    path.write_bytes(pickle.dumps(([1.5, 2.5], [True])))
    with pytest.raises(ValueError, match="image 0 is a float"):
        read_bin(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a verification .bin pickle"):
        read_bin(path)
    with pytest.raises(ValueError, match="two images per pair"):
        write_bin(path, jpegs[:3], [True])
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_bin(tmp_path / "nope.bin")


def test_corrupt_image_in_a_bin_names_it(jpegs, tmp_path):
    write_bin(tmp_path / "x.bin", [jpegs[0], jpegs[1][:500]], [True])
    dataset = BinVerificationSet(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="x.bin image 1: corrupt JPEG"):
        dataset[1]
