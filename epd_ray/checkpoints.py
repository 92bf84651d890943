"""What a checkpoint holds and how it loads safely.

A checkpoint file is a dict of plain values and tensors: for each network its registry kind, the
constructor arguments that rebuild it (nanoGPT style) and its weights, plus whatever training state the
writer adds. It is always read with `torch.load(weights_only=True)`, which refuses arbitrary pickled
objects, so a tampered or foreign file fails with a clear message instead of running code. This module
sits below training and deployment: a deployed model needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from epd_ray.artifacts import atomic_file
from epd_ray.core.draws import BestOfDraws
from epd_ray.core.networks import build_network

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


def network_record(kind: str, module: nn.Module) -> dict[str, Any]:
    module = getattr(module, "module", module)  # unwrap DistributedDataParallel
    return {"kind": kind, "config": dict(module.config), "state_dict": module.state_dict()}


def build_from_record(record: dict[str, Any], path: Path | str = "checkpoint") -> nn.Module:
    try:
        module = build_network(record["kind"], **record["config"])
        module.load_state_dict(record["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{path}: network record does not rebuild ({exc})") from None
    return module


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous file, never half of a new one."""
    with atomic_file(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or tampered files
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a loadable epd-ray checkpoint "
                              f"({type(exc).__name__}: {first_line})") from None
    if (not isinstance(payload, dict) or payload.get("format") != FORMAT
            or not _is_network_table(payload.get("networks"))):
        raise CheckpointError(f"{path}: not an epd-ray checkpoint (format {FORMAT} with a table of networks expected)")
    return payload


def _is_network_table(networks: Any) -> bool:
    return isinstance(networks, dict) and all(
        isinstance(record, dict) and {"kind", "config", "state_dict"} <= set(record) for record in networks.values())


def require_network(payload: dict[str, Any], name: str, path: Path | str) -> dict[str, Any]:
    """The record of network `name` in a loaded checkpoint; CheckpointError naming the file and what it holds
    when it has none."""
    networks = payload.get("networks") or {}
    if name not in networks:
        raise CheckpointError(f"{path}: holds no network {name!r} (has {', '.join(networks) or 'none'})")
    return networks[name]


def load_network(path: Path, name: str) -> nn.Module:
    return build_from_record(require_network(load_checkpoint(path), name, path), path)


READER = "expression_reader"  # the network that picks between draws (core/draws.py), next to the generator
EMOTION_VERIFIER = "emotion_verifier"  # S, and its siblings `emotion_verifier_<i>` when L_CE reads several
PICKER = "expression_picker"  # pretrained networks `expression_picker_<i>`: the readers that pick between draws
READERS = "expression_readers"  # the kind of READER's and TELLER's records: `networks.ExpressionReaders`
TELLER = "expression_teller"  # the readers of the original whose reading a generator told the expression is told


def readers_record(members: list[dict[str, Any]], views: bool) -> dict[str, Any]:
    """The record of `networks.ExpressionReaders` over the classifiers of the records `members`."""
    state = {f"members.{i}.{key}": value for i, member in enumerate(members)
             for key, value in member["state_dict"].items()}
    config = {"members": [{"kind": m["kind"], "config": m["config"]} for m in members], "views": views}
    return {"kind": READERS, "config": config, "state_dict": state}


def emotion_verifiers(pretrained: dict[str, Any]) -> dict[str, Any]:
    """The record of what the generator's L_CE reads through: S, or S and its siblings `emotion_verifier_<i>`
    (`verifiers.emotion_verifiers`) as one ensemble of their mean probabilities."""
    members = [record for name, record in sorted(pretrained.items()) if name.startswith(EMOTION_VERIFIER)]
    return members[0] if len(members) == 1 else readers_record(members, views=False)


def draw_readers(pretrained: dict[str, Any]) -> dict[str, Any]:
    """The record of the readers that pick between draws, from the pretrained networks' records: the
    expression pickers, each reading an image once; without them S, over six views (core/draws.py)."""
    pickers = [record for name, record in sorted(pretrained.items()) if name.startswith(PICKER)]
    return readers_record(pickers, views=False) if pickers else readers_record([pretrained[EMOTION_VERIFIER]], True)


def expression_tellers(pretrained: dict[str, Any]) -> dict[str, Any]:
    """The record of the readers that read in each original the expression a generator told it is told
    (`model.expression_input`), from the pretrained networks' records: every emotion classifier pretrained for
    the generator, S and its siblings and the expression pickers, as one ensemble; not the evaluators, which
    judge. S is a poor picker because the generator was trained through it, but an original owes it nothing:
    on people the data set lacks, more readers read more of the expressions right (core/draws.py). Without
    pickers they read over six views, as S does when it picks."""
    members = [record for name, record in sorted(pretrained.items()) if name.startswith((EMOTION_VERIFIER, PICKER))]
    return readers_record(members, views=not any(name.startswith(PICKER) for name in pretrained))


def published_payload(generator: dict[str, Any], reader: dict[str, Any] | None, draws: int,
                      teller: dict[str, Any] | None = None) -> dict[str, Any]:
    """The part of a checkpoint that rebuilds the published de-identifier: the generator's record and, with
    more than one draw or a generator told the expression, the expression reader's and the number of draws;
    for a generator told the expression, the tellers' record when there is one (else the readers tell)."""
    told = bool(generator["config"].get("expressions"))
    if draws == 1 and not told:
        return {"networks": {"generator": generator}, "draws": 1}
    if reader is None:
        need = "a generator told the expression needs" if told else f"{draws} draws need"
        raise ValueError(f"{need} the expression reader's record")
    tellers = {TELLER: teller} if told and teller is not None else {}
    return {"networks": {"generator": generator, READER: reader, **tellers}, "draws": int(draws)}


def load_deidentifier(payload: dict[str, Any], path: Path | str) -> BestOfDraws:
    """The published de-identifier of a loaded checkpoint (`published_payload`); one draw for checkpoints
    written before draws existed, the readers telling for those written before the tellers."""
    generator = build_from_record(require_network(payload, "generator", path), path)
    draws = payload.get("draws", 1)
    if not isinstance(draws, int) or draws < 1:
        raise CheckpointError(f"{path}: draws must be a whole number >= 1, got {draws!r}")
    reader = None
    if draws > 1 or getattr(generator, "expressions", 0):
        record = require_network(payload, READER, path)
        if record.get("kind") == "emotion_verifier":  # written when S alone picked, over six views
            record = readers_record([record], views=True)
        reader = build_from_record(record, path)
    teller = payload["networks"].get(TELLER)  # written for told generators only (`published_payload`)
    return BestOfDraws(generator, reader, draws, build_from_record(teller, path) if teller else None).eval()
