"""Python API: compress a fine-tuned checkpoint against its base, apply a delta, inspect and verify files.

>>> import deltadct
>>> delta = deltadct.compress("base/", "finetuned/", method="deltadct", out="ft.delta.safetensors", patch_size=16)
>>> delta.info()["bits_per_param"]
>>> deltadct.apply("base/", "ft.delta.safetensors", out="reconstructed/")   # a from_pretrained-able dir

Tensors are streamed: each base/fine-tuned pair is read (memory-mapped), compressed and written before
the next is touched, so peak memory is about one layer plus the compressed output's index.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointReader, check_match, match_keys, open_checkpoint
from .errors import ConfigError, FingerprintMismatchError, NonFiniteError, ShapeMismatchError
from .format import (FORMAT_NAME, FORMAT_VERSION, VALUE_FIELD, DeltaFile, canonical_json, finalize_header,
                     in_memory, load, read_header, tensor_name, verify_checksum)
from .io import SafetensorsWriter, atomic_path, check_output_path, dtype_from_name, dtype_name, tensor_bytes
from .methods import Method, create_method
from .policy import TensorPolicy

PathLike = str | os.PathLike


@dataclass
class Plan:
    """What happens to each fine-tuned tensor."""

    compressed: list[str]
    kept: list[str]
    new: list[str]
    from_base: list[str]  # not stored: the result takes the base tensor (policy others=drop)


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu`` or ``cuda[:N]`` as a torch device; anything else, or CUDA where there is none, a ConfigError."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device name; use 'cpu' or 'cuda'") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def _as_policy(policy: TensorPolicy | Mapping[str, Any] | None) -> TensorPolicy:
    if isinstance(policy, TensorPolicy):
        policy.validate()
        return policy
    return TensorPolicy.from_dict(policy or {})


def plan_tensors(base: CheckpointReader, finetuned: CheckpointReader, method: Method, policy: TensorPolicy):
    match = match_keys(base, finetuned)
    check_match(match, extra_keys=policy.extra_keys, missing_keys=policy.missing_keys,
                base_path=base.path, finetuned_path=finetuned.path)
    plan = Plan([], [], [], [])
    too_small = None  # the first selected matrix the method refused, if any
    for name, bname in match.pairs.items():
        shape = tuple(finetuned.shape(name))
        # integer/bool tensors (buffers, index tables) are never approximated: a lossy delta would round wrongly
        floating = finetuned.dtype(name).is_floating_point and base.dtype(bname).is_floating_point
        if floating and policy.selects(name, len(shape)) and all(s > 0 for s in shape):
            try:
                method.check_shape(shape, name)
                plan.compressed.append(name)
                continue
            except ConfigError as exc:
                if policy.too_small == "error":
                    raise
                too_small = too_small or exc
        (plan.kept if policy.others == "keep" else plan.from_base).append(name)
    if too_small is not None and not plan.compressed:
        # every selected matrix is below the method's minimum: the "compressed" file would hold none
        raise ConfigError(f"{too_small}; no tensor of {finetuned.path} can be compressed with these options")
    plan.new = sorted(set(match.extra) | set(match.mismatched)) if policy.extra_keys == "keep" else []
    return match, plan


def _header(method: str, codec: Method, policy: TensorPolicy, entries: dict, plan: Plan, match, fingerprint: str,
            ft_ckpt: CheckpointReader) -> dict:
    """The deltadct header of a compressed file (before its content checksum)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": method,
        "config": codec.config.to_dict(),
        "policy": policy.to_dict(),
        "entries": entries,
        "from_base": plan.from_base,
        "key_map": {"finetuned_prefix": match.finetuned_prefix, "base_prefix": match.base_prefix},
        "base_fingerprint": fingerprint,
        "model_config": ft_ckpt.config_json(),
    }


def _fixed_header_bytes(method: str, codec: Method, policy: TensorPolicy, plan: Plan, match,
                        ft_ckpt: CheckpointReader) -> int:
    """An upper bound on the file-header bytes that do not belong to a compressed tensor: the header
    with every kept/new entry (byte counts and offsets at their widest), checksums, and the tensor
    index of the kept values, each escaped once more as the safetensors metadata string it sits in.
    Methods that fill a budget measured on disk plan with it (``Method.plan(header_bytes=...)``)."""
    widest, entries, index = 10 ** 12, {}, {}
    for kind, names in (("kept", plan.kept), ("new", plan.new)):
        for name in names:
            shape, dtype = list(ft_ckpt.shape(name)), dtype_name(ft_ckpt.dtype(name))
            entries[name] = {"kind": kind, "shape": shape, "dtype": dtype, "fields": [VALUE_FIELD], "bytes": widest}
            index[tensor_name(name, VALUE_FIELD)] = {"dtype": dtype, "shape": shape, "data_offsets": [widest, widest]}
    header = _header(method, codec, policy, entries, plan, match, "0" * 64, ft_ckpt)
    header["content_sha256"] = "0" * 64
    return len(json.dumps(canonical_json(header))) + len(json.dumps(index))


def _check_finite(tensor: torch.Tensor, name: str, where: Any) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"tensor {name!r} in {where} has {bad} NaN/Inf value(s)")


def _fingerprint_update(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}|{dtype_name(tensor.dtype)}|{list(tensor.shape)}\n".encode())
    digest.update(tensor_bytes(tensor))


def compress(base: PathLike, finetuned: PathLike, method: str = "deltadct", out: PathLike | None = None, *,
             device: str | torch.device = "cpu", policy: TensorPolicy | Mapping[str, Any] | None = None,
             progress: bool = True, overwrite: bool = False, record_errors: bool = True,
             calibration: Mapping[str, torch.Tensor] | None = None, **method_config: Any) -> DeltaFile:
    """Compress ``finetuned − base`` with a registered method; write it to ``out`` if given.

    ``calibration``: {fine-tuned tensor name: Hessian of that layer's inputs} for methods that need
    calibration data (``Method.needs_calibration``; :func:`deltadct.calibration.collect_hessians`).
    Everything that can be checked before reading weights is checked first (method name and options,
    policy, output path, key sets and shapes), so a bad call fails fast and writes nothing.
    """
    codec = create_method(method, method_config)
    policy = _as_policy(policy)
    dev = resolve_device(device)
    if out is not None:
        check_output_path(out, overwrite=overwrite)
    base_ckpt, ft_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
    match, plan = plan_tensors(base_ckpt, ft_ckpt, codec, policy)
    if codec.needs_calibration:
        uncovered = [name for name in plan.compressed if name not in (calibration or {})]
        if uncovered:
            raise ConfigError(f"method {method!r} needs calibration data (layer-input Hessians) for every compressed "
                              f"tensor; {len(uncovered)} have none, e.g. {uncovered[:3]}: pass calibration= "
                              "(deltadct-run: calibration=task) or exclude them with policy.exclude")

    def deltas():
        for name in plan.compressed:
            b, f = base_ckpt.get(match.pairs[name]), ft_ckpt.get(name)
            _check_finite(b, match.pairs[name], base_ckpt.path)
            _check_finite(f, name, ft_ckpt.path)
            yield name, b, f.to(dev, torch.float32) - b.to(dev, torch.float32)

    if codec.needs_plan:
        codec.plan(((name, d) for name, _, d in deltas()),
                   header_bytes=_fixed_header_bytes(method, codec, policy, plan, match, ft_ckpt))

    spool_dir = None if out is None else (Path(out).parent if str(Path(out).parent) else Path("."))
    writer = SafetensorsWriter(spool_dir)
    try:
        entries: dict[str, dict] = {}
        fingerprint = hashlib.sha256()
        bar = tqdm(deltas(), total=len(plan.compressed), desc=f"compress [{method}]", unit="tensor",
                   disable=not progress)
        for name, b, delta in bar:
            packed = codec.compress(delta, name=name, **(
                {"hessian": calibration[name].to(dev)} if codec.needs_calibration else {}))
            entry = {"kind": "compressed", "shape": list(delta.shape), "dtype": dtype_name(ft_ckpt.dtype(name)),
                     "fields": sorted(packed.tensors), "bytes": packed.payload_bytes}
            if packed.meta:
                entry["meta"] = packed.meta
            if record_errors:
                approx = codec.reconstruct(packed, tuple(delta.shape))
                norm = float(torch.linalg.vector_norm(delta))
                err = float(torch.linalg.vector_norm(approx - delta))
                entry["rel_error"] = round(err / norm, 6) if norm > 0 else (0.0 if err == 0 else 1.0)
            for field in entry["fields"]:
                writer.add(tensor_name(name, field), packed.tensors[field])
            entries[name] = entry
            _fingerprint_update(fingerprint, match.pairs[name], b)
        for kind, names in (("kept", plan.kept), ("new", plan.new)):
            for name in names:
                value = ft_ckpt.get(name)
                _check_finite(value, name, ft_ckpt.path)
                writer.add(tensor_name(name, VALUE_FIELD), value)
                entries[name] = {"kind": kind, "shape": list(value.shape), "dtype": dtype_name(value.dtype),
                                 "fields": [VALUE_FIELD], "bytes": value.numel() * value.element_size()}
        header = finalize_header(_header(method, codec, policy, entries, plan, match, fingerprint.hexdigest(),
                                         ft_ckpt), writer)
        if out is None:
            return in_memory(header, writer)
        with atomic_path(out, overwrite=overwrite) as tmp:
            writer.finish(tmp, {FORMAT_NAME: canonical_json(header)})
        return load(out, verify=False)
    finally:
        writer.close()


def _as_delta(delta: PathLike | DeltaFile) -> DeltaFile:
    return delta if isinstance(delta, DeltaFile) else load(delta)


def _base_name(header: dict, name: str) -> str:
    km = header.get("key_map", {})
    fp, bp = km.get("finetuned_prefix", ""), km.get("base_prefix", "")
    return bp + name[len(fp):]


def iter_applied(base: PathLike | CheckpointReader, delta: PathLike | DeltaFile, *,
                 device: str | torch.device = "cpu", progress: bool = False):
    """Yield ``(fine-tuned name, reconstructed tensor)`` one at a time, then check the base fingerprint.

    Raises :class:`FingerprintMismatchError` (after the last tensor, before the caller commits anything)
    when the base is not the one the delta was made from. Shapes are checked up front.
    """
    dfile = _as_delta(delta)
    dev = resolve_device(device)
    ckpt = base if isinstance(base, CheckpointReader) else open_checkpoint(base)
    header = dfile.header
    where = dfile.path or "the delta"
    for name, entry in dfile.entries.items():
        if entry["kind"] == "compressed":
            bname = _base_name(header, name)
            if bname not in ckpt:
                raise FingerprintMismatchError(f"{ckpt.path} has no tensor {bname!r} that {where} was made "
                                               "against: wrong base checkpoint")
            if list(ckpt.shape(bname)) != list(entry["shape"]):
                raise FingerprintMismatchError(
                    f"tensor {bname!r} has shape {list(ckpt.shape(bname))} in {ckpt.path} but {entry['shape']} "
                    f"in {where}: wrong base checkpoint")
    for name in header.get("from_base", []):
        if _base_name(header, name) not in ckpt:
            raise FingerprintMismatchError(f"{ckpt.path} has no tensor {_base_name(header, name)!r}: wrong base")
    fingerprint = hashlib.sha256()
    names = list(dfile.entries) + list(header.get("from_base", []))
    for name in tqdm(names, desc="apply", unit="tensor", disable=not progress):
        entry = dfile.entries.get(name)
        if entry is None:  # left to the base by the policy
            yield name, ckpt.get(_base_name(header, name))
        elif entry["kind"] == "compressed":
            bname = _base_name(header, name)
            b = ckpt.get(bname)
            _fingerprint_update(fingerprint, bname, b)
            approx = dfile.reconstruct(name, dev)
            yield name, (b.to(dev, torch.float32) + approx).to(dtype_from_name(entry["dtype"])).cpu()
        else:
            yield name, dfile.value(name)
    if fingerprint.hexdigest() != header["base_fingerprint"]:
        raise FingerprintMismatchError(f"{ckpt.path} is not the base {where} was made from "
                                       "(base fingerprint mismatch)")


def apply(base: PathLike, delta: PathLike | DeltaFile, out: PathLike | None = None, *,
          device: str | torch.device = "cpu", progress: bool = True, overwrite: bool = False
          ) -> dict[str, torch.Tensor] | Path:
    """Reconstruct the fine-tuned weights from ``base`` + ``delta``.

    Without ``out`` returns the state dict (fine-tuned tensor names). With ``out`` writes a model
    directory: ``model.safetensors`` plus the base directory's tokenizer/processor files and the
    fine-tuned ``config.json`` recorded in the delta, so ``from_pretrained`` (or the loader used for the
    base) opens it. The directory appears only once complete and verified.
    """
    dfile = _as_delta(delta)
    if out is None:
        return dict(iter_applied(base, dfile, device=device, progress=progress))
    check_output_path(out, overwrite=overwrite)
    ckpt = open_checkpoint(base)
    with atomic_path(out, is_dir=True, overwrite=overwrite) as tmp:
        writer = SafetensorsWriter(tmp)
        try:
            for name, tensor in iter_applied(ckpt, dfile, device=device, progress=progress):
                writer.add(name, tensor)
            writer.finish(tmp / "model.safetensors", {"format": "pt"})
        finally:
            writer.close()
        for file in ckpt.sidecar_files():
            shutil.copy2(file, tmp / file.name)
        if dfile.header.get("model_config") is not None:
            (tmp / "config.json").write_text(canonical_json(dfile.header["model_config"]))
    return Path(out)


def reconstruct(base: PathLike, delta: PathLike | DeltaFile, **kwargs: Any) -> dict[str, torch.Tensor]:
    """The reconstructed fine-tuned state dict, in memory (alias of ``apply`` without ``out``)."""
    return apply(base, delta, None, **kwargs)  # type: ignore[return-value]


def save(delta: DeltaFile, path: PathLike, *, overwrite: bool = False) -> Path:
    return delta.save(path, overwrite=overwrite)


def info(path: PathLike | DeltaFile) -> dict[str, Any]:
    return _as_delta(path).info()


def verify(path: PathLike, base: PathLike | None = None) -> dict[str, Any]:
    """Check container, header and content checksum; with ``base``, also the base fingerprint.

    Does not reconstruct anything. Returns a small report; raises on the first failure.
    """
    path = Path(path)
    header, offset, index = read_header(path)
    verify_checksum(path, header, offset, index)
    report = {"path": str(path), "checksum": "ok", "method": header["method"]}
    if base is not None:
        ckpt = open_checkpoint(base)
        digest = hashlib.sha256()
        for name, entry in header["entries"].items():
            if entry["kind"] != "compressed":
                continue
            bname = _base_name(header, name)
            if bname not in ckpt or list(ckpt.shape(bname)) != list(entry["shape"]):
                raise FingerprintMismatchError(f"{base} is not the base {path} was made from "
                                               f"(tensor {bname!r} absent or of another shape)")
            _fingerprint_update(digest, bname, ckpt.get(bname))
        if digest.hexdigest() != header["base_fingerprint"]:
            raise FingerprintMismatchError(f"{base} is not the base {path} was made from (fingerprint mismatch)")
        report["fingerprint"] = "ok"
    return report


__all__ = ["compress", "apply", "reconstruct", "save", "load", "info", "verify", "iter_applied",
           "plan_tensors", "DeltaFile", "TensorPolicy", "ShapeMismatchError"]
