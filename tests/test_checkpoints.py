"""Checkpoints (epd_ray/checkpoints.py): networks rebuilt from kind + config + weights, foreign or
tampered files refused with a message naming the file, and atomic writes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import epd_ray.artifacts as artifacts
from epd_ray.checkpoints import (
    FORMAT,
    CheckpointError,
    build_from_record,
    load_checkpoint,
    load_network,
    network_record,
    save_checkpoint,
)
from epd_ray.core.networks import PatchDiscriminator, UNetGenerator

torch.set_num_threads(2)

CODE_RAN: list[str] = []


def _side_effect(tag: str) -> str:
    CODE_RAN.append(tag)
    return tag


class SomeClass:
    """An arbitrary Python object; unpickling it must not be allowed."""

    def __init__(self):
        self.payload = "anything"


class RunsCode:
    """A pickle that would call a function on load (the classic code-execution vector)."""

    def __reduce__(self):
        return (_side_effect, ("code ran on load",))


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def _trained_generator(seed=0) -> UNetGenerator:
    """A tiny generator whose weights and BatchNorm statistics differ from a fresh one's."""
    torch.manual_seed(seed)
    g = UNetGenerator(image_size=32, ngf=4)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g.train()
    with torch.no_grad():
        g(_images(4, seed=seed + 100))  # moves the BatchNorm running statistics
    return g


def _save_generator(path: Path, g: nn.Module, **extra) -> None:
    save_checkpoint(path, {"networks": {"generator": network_record("generator", g)}, **extra})


# ---------------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------------


def test_generator_round_trip_gives_identical_output(tmp_path):
    g = _trained_generator()
    path = tmp_path / "ckpt" / "generator.pt"  # parent folder created
    _save_generator(path, g, epoch=3, metrics={"score": 0.5})
    loaded = load_network(path, "generator")
    assert isinstance(loaded, UNetGenerator)
    assert loaded.config == g.config == dict(image_size=32, ngf=4, norm="batch", dropout=0.5, in_channels=3,
                                             out_channels=3)
    for net in (g, loaded):
        net.eval()
        net.deterministic = True
    x = _images()
    with torch.no_grad():
        expected, got = g(x), loaded(x)
    assert torch.equal(got, expected)
    # the weights, not the architecture, make the output: a fresh generator of the same shape differs
    fresh = UNetGenerator(image_size=32, ngf=4).eval()
    fresh.deterministic = True
    with torch.no_grad():
        assert not torch.allclose(fresh(x), expected)
    # running statistics came back too
    for (name, a), (_, b) in zip(g.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_keeps_format_and_extra_state(tmp_path):
    path = tmp_path / "c.pt"
    _save_generator(path, _trained_generator(), epoch=3, metrics={"score": 0.5})
    payload = load_checkpoint(path)
    assert payload["format"] == FORMAT
    assert payload["epoch"] == 3
    assert payload["metrics"] == {"score": 0.5}
    assert set(payload["networks"]) == {"generator"}
    assert payload["networks"]["generator"]["kind"] == "generator"


def test_several_networks_in_one_file(tmp_path):
    g = _trained_generator()
    d = PatchDiscriminator(ndf=4, n_layers=2)
    path = tmp_path / "both.pt"
    save_checkpoint(path, {"networks": {"generator": network_record("generator", g),
                                        "discriminator": network_record("discriminator", d)}})
    d2 = load_network(path, "discriminator")
    assert isinstance(d2, PatchDiscriminator) and d2.config == d.config
    assert isinstance(load_network(path, "generator"), UNetGenerator)


def test_network_record_unwraps_a_ddp_style_wrapper():
    g = _trained_generator()

    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    record = network_record("generator", Wrapper(g))
    assert record["config"] == g.config
    assert set(record["state_dict"]) == set(g.state_dict())
    assert not any(k.startswith("module.") for k in record["state_dict"])


def test_record_with_mismatched_weights_is_refused_naming_the_file(tmp_path):
    record = network_record("generator", _trained_generator())
    record["config"] = dict(record["config"], ngf=8)  # weights of ngf=4 for an ngf=8 network
    path = tmp_path / "mismatch.pt"
    save_checkpoint(path, {"networks": {"generator": record}})
    with pytest.raises(CheckpointError, match="mismatch.pt.*does not rebuild"):
        load_network(path, "generator")


@pytest.mark.parametrize("mutate", [
    lambda r: r.update(kind="nosuchnet"),
    lambda r: r.pop("state_dict"),
    lambda r: r.update(config={"image_size": 33, "ngf": 4}),
    lambda r: r.update(config={"image_size": 32, "ngf": 4, "colour": "red"}),
], ids=["unknown-kind", "no-weights", "bad-size", "unknown-argument"])
def test_build_from_record_refuses_broken_records(mutate):
    record = network_record("generator", UNetGenerator(image_size=32, ngf=4))
    mutate(record)
    with pytest.raises(CheckpointError, match=r"^where/it\.pt: "):
        build_from_record(record, "where/it.pt")


# ---------------------------------------------------------------------------------------------------------
# Refusals name the file
# ---------------------------------------------------------------------------------------------------------


def test_wrong_network_name_lists_what_the_file_has(tmp_path):
    path = tmp_path / "g.pt"
    save_checkpoint(path, {"networks": {"generator": network_record("generator", _trained_generator()),
                                        "discriminator": network_record("discriminator",
                                                                        PatchDiscriminator(ndf=4, n_layers=2))}})
    with pytest.raises(CheckpointError) as info:
        load_network(path, "identity_verifier")
    message = str(info.value)
    assert str(path) in message
    assert "identity_verifier" in message
    assert "generator" in message and "discriminator" in message


def _refused(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        load_network(path, "generator")
    return str(info.value)


def test_missing_file_is_refused(tmp_path):
    _refused(tmp_path / "nowhere.pt")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_refused(tmp_path, seed):
    path = tmp_path / "random.pt"
    path.write_bytes(random.Random(seed).randbytes(4096))
    _refused(path)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    _refused(path)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_refused(tmp_path, fraction):
    good = tmp_path / "good.pt"
    _save_generator(good, _trained_generator())
    data = good.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    _refused(path)


def test_pickled_python_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "networks": {}, "evil": SomeClass()}, path)
    message = _refused(path)
    assert "not a loadable" in message


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "networks": {}, "evil": RunsCode()}, path)
    CODE_RAN.clear()
    _refused(path)
    assert CODE_RAN == []
    # the file really would have run code with a plain unpickler
    torch.load(path, weights_only=False)
    assert CODE_RAN == ["code ran on load"]
    CODE_RAN.clear()


def test_plain_tensor_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3, 4), path)
    message = _refused(path)
    assert "not an epd-ray checkpoint" in message


@pytest.mark.parametrize("payload", [
    {"networks": {}},  # no format
    {"format": 2, "networks": {}},  # another format
    {"format": 1},  # no networks
    [1, 2, 3],
], ids=["no-format", "format-2", "no-networks", "a-list"])
def test_foreign_torch_files_are_refused(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    assert "not an epd-ray checkpoint" in _refused(path)


@pytest.mark.parametrize("content", [b"", b"\x80\x02"], ids=["empty", "pickle-header-only"])
def test_empty_or_header_only_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.pt"
    path.write_bytes(content)
    _refused(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("networks", [
    {"generator": torch.zeros(1)},
    torch.zeros(3),
    ["generator"],
], ids=["tensor-record", "tensor-networks", "list-networks"])
def test_tampered_networks_entry_is_refused(tmp_path, networks):
    path = tmp_path / "tampered.pt"
    torch.save({"format": 1, "networks": networks}, path)
    with pytest.raises(CheckpointError, match="tampered.pt"):
        load_network(path, "generator")


# ---------------------------------------------------------------------------------------------------------
# Atomic save
# ---------------------------------------------------------------------------------------------------------


def test_save_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "c.pt"
    _save_generator(path, _trained_generator())
    _save_generator(path, _trained_generator(seed=1))  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_save_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"networks": {}, "version": 1})
    real_replace = os.replace
    seen = []

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        # the new checkpoint is complete beside the target before the rename, and the target still
        # holds the previous one: a reader sees the old file or the new one, never a partial file
        seen.append((src, dst, load_checkpoint(src)["version"], load_checkpoint(dst)["version"]))
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", spy)  # save_checkpoint writes through artifacts.atomic_file
    save_checkpoint(path, {"networks": {}, "version": 2})
    assert len(seen) == 1
    src, dst, new_version, old_version = seen[0]
    assert dst == path
    assert src.parent == path.parent and src.name.startswith(".")
    assert (new_version, old_version) == (2, 1)
    assert not src.exists()
    assert load_checkpoint(path)["version"] == 2


@pytest.mark.parametrize("error", [RuntimeError("disk full (injected)"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"networks": {}, "version": 1})
    before = path.read_bytes()
    real_save = torch.save

    def partial_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(type(error)):
        save_checkpoint(path, {"networks": {}, "version": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("injected")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path / "c.pt", {"networks": {}})
    assert list(tmp_path.iterdir()) == []
