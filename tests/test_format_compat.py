"""Files of earlier releases stay readable: the format-version-1 files in tests/fixtures/format_v1 (written
by deltadct 0.1.0) open and decode as they did (to the last float32 ulp), and options a file lacks are read
with the value its config version implied, never with today's default."""
from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltadct
from deltadct.errors import FormatError
from deltadct.format import FORMAT_NAME, canonical_json, content_checksum, data_checksum
from deltadct.methods import METHODS, Compressed, Method, MethodConfig, versioned_field

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"
V1_FILES = sorted(FIXTURES.glob("*.delta.safetensors"))


def test_fixtures_are_there():
    methods = {deltadct.load(p).method_name for p in V1_FILES}
    assert methods == {"deltadct", "deltadct_auto", "bitdelta", "dare", "rtn", "delta_come"}


@pytest.mark.parametrize("path", V1_FILES, ids=lambda p: p.name.split(".")[0])
def test_a_previous_release_file_opens_and_decodes_identically(path):
    delta = deltadct.load(path)  # checksum verified
    assert "config_version" not in delta.header and "deltadct_version" not in delta.header  # written before both
    assert delta.config_version == 1
    expected = load_file(path.with_name(path.name.replace(".delta.", ".reconstructed.")))
    base = load_file(FIXTURES / "base.safetensors")
    rebuilt = deltadct.reconstruct(FIXTURES / "base.safetensors", path, progress=False)
    assert rebuilt.keys() == expected.keys()
    for name, tensor in expected.items():
        # the same codes and side information decode to the same values up to the float32 rounding of
        # the CPU's matrix kernels (the fixtures' machine and this one may sum a DCT in different orders):
        # measured at most 1 ulp of the weight, 4e-7 of the delta's largest entry
        moved = (tensor - base[name]).abs().max().item()
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=4e-6 * moved, msg=name)
    report = deltadct.verify(path, base=FIXTURES / "base.safetensors")
    assert report["checksum"] == "ok" and report["fingerprint"] == "ok"


def test_a_new_header_records_every_option_versions_and_the_base(tmp_path, real_pair):
    config = METHODS.get("deltadct").Config(patch_size=8)
    delta = deltadct.compress(*real_pair, config, out=tmp_path / "d.safetensors", progress=False)
    header = deltadct.load(tmp_path / "d.safetensors").header
    assert header["config"] == config.to_dict() and set(header["config"]) == {
        f.name for f in dataclasses.fields(config)}
    assert header["config_version"] == type(config).VERSION == 1
    assert header["deltadct_version"] == deltadct.__version__
    assert header["base_model"] == {"name": None, "revision": None}  # a bare state dict names no model
    assert delta.method.config == config


def test_base_name_and_revision_come_from_a_hub_snapshot_or_config_json(tmp_path):
    from deltadct.format import describe_base

    commit = "e2da8e2f811d1448a5b465c236feacd80ffbac7b"
    snapshot = tmp_path / "hub" / "models--FacebookAI--roberta-base" / "snapshots" / commit
    assert describe_base(snapshot / "model.safetensors", {"_name_or_path": "/tmp/x"}) == {
        "name": "FacebookAI/roberta-base", "revision": commit}
    assert describe_base(tmp_path / "base", {"_name_or_path": "roberta-base"}) == {"name": "roberta-base",
                                                                                 "revision": None}
    assert describe_base(tmp_path / "base", None) == {"name": None, "revision": None}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_versioned_option_fits_its_config_version(name):
    cls = METHODS.get(name).Config
    for f in dataclasses.fields(cls):
        since = f.metadata.get("since", 1)
        assert 1 <= since <= cls.VERSION, f"{name}.{f.name} is declared since version {since} > {cls.VERSION}"
        if since > 1:
            cls.from_dict({f.name: f.metadata["before"]})  # the implied value is a valid setting


# ------------------------------------------------------------------ an option added after files were written

@dataclass
class GainConfig(MethodConfig):
    VERSION = 2
    #: added in version 2; version-1 files were decoded with a gain of 1
    gain: float = versioned_field(0.5, since=2, before=1.0)


class Gain(Method):
    """Stores the delta exactly and multiplies it by ``gain`` when decoding: a decoding option."""

    name = "test_gain"
    Config = GainConfig

    def compress(self, delta, *, name=""):
        return Compressed({"values": delta.clone()})

    def reconstruct(self, compressed, shape):
        return compressed.tensors["values"].reshape(shape) * self.config.gain


@pytest.fixture
def gain_method():
    METHODS.register(Gain)
    yield Gain
    METHODS.unregister(Gain.name)


def raw_container(path: Path) -> tuple[dict, int]:
    """The safetensors index and data offset, read without deltadct's checks (which refuse some edits)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(size)), 8 + size


def rewrite_header(path: Path, edit) -> None:
    """Edit the deltadct header of ``path`` in place and give it a valid content checksum again."""
    tensors = load_file(path)
    header = json.loads(raw_container(path)[0]["__metadata__"][FORMAT_NAME])
    edit(header)
    for _ in range(2):  # once to lay the data out under the new header, once with its checksum
        save_file(tensors, path, metadata={FORMAT_NAME: canonical_json(header)})
        index, offset = raw_container(path)
        index.pop("__metadata__")
        header["content_sha256"] = content_checksum(header, data_checksum(path, offset), index)
    save_file(tensors, path, metadata={FORMAT_NAME: canonical_json(header)})


def test_a_missing_decoding_option_is_read_with_its_versioned_value(gain_method, real_pair, tmp_path):
    path = tmp_path / "gain.safetensors"
    written = deltadct.compress(*real_pair, "test_gain", out=path, progress=False, gain=2.0)
    name = written.names("compressed")[0]
    exact = written.reconstruct(name) / 2.0
    assert json.loads(json.dumps(written.header["config"])) == {"gain": 2.0, "seed": 0}

    rewrite_header(path, lambda h: h["config"].pop("gain"))  # a file of today's version that lacks it
    torch.testing.assert_close(deltadct.load(path).reconstruct(name), exact * 0.5, rtol=0, atol=0)

    def as_version_1(header):  # what a file written before the option existed looks like
        header["config_version"] = 1
    rewrite_header(path, as_version_1)
    assert deltadct.load(path).method.config.gain == 1.0  # the versioned value, not today's 0.5
    torch.testing.assert_close(deltadct.load(path).reconstruct(name), exact, rtol=0, atol=0)

    rewrite_header(path, lambda h: h["config"].update(gain=3.0))  # a recorded value always wins
    torch.testing.assert_close(deltadct.load(path).reconstruct(name), exact * 3.0, rtol=0, atol=0)

    rewrite_header(path, lambda h: h.update(config_version=3))
    # refused when opened (the header check reads the config as the decoder will), not at first decode
    with pytest.raises(FormatError, match="version 3 of GainConfig, newer than this deltadct reads \\(2\\)"):
        deltadct.load(path)
