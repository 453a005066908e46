"""Python API: compress a fine-tuned checkpoint against its base, apply a delta, inspect and verify files.

>>> import deltadct
>>> delta = deltadct.compress("base/", "finetuned/", method="deltadct", out="ft.delta.safetensors", patch_size=16)
>>> delta.info()["bits_per_param"]
>>> deltadct.apply("base/", "ft.delta.safetensors", out="reconstructed/")   # a from_pretrained-able dir

Tensors are streamed (:mod:`deltadct.pipeline`): a few layers are read ahead in worker threads, deltas
are formed and compressed on the device, results are written and the base is fingerprinted on
background threads, so peak memory is a few layers plus the compressed output's index.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointReader, check_match, match_keys, open_checkpoint
from .errors import ConfigError, FingerprintMismatchError, FormatError, NonFiniteError, ShapeMismatchError
from . import __version__
from .fingerprint import CHUNKED, BaseFingerprint, algorithm_of
from .format import (FORMAT_NAME, FORMAT_VERSION, VALUE_FIELD, DeltaFile, canonical_json, describe_base,
                     finalize_header, in_memory, load, read_header, tensor_name, verify_checksum)
from .io import (PlannedSafetensorsWriter, SafetensorsWriter, atomic_path, check_output_path, dtype_from_name,
                 dtype_name)
from .methods import Method, MethodConfig, create_method
from .pipeline import (BackgroundWriter, LaggedChecks, delta_of, prefetch, reader_threads, relative_error,
                       rounded_relative_error, surely_finite, to_device)
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
            ft_ckpt: CheckpointReader, base_ckpt: CheckpointReader) -> dict:
    """The deltadct header of a compressed file (before its content checksum). Every option of the
    method is recorded with its value and config version, so a reader never falls back on its own defaults."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "deltadct_version": __version__,
        "method": method,
        "config": codec.config.to_dict(),
        "config_version": type(codec.config).VERSION,
        "base_model": describe_base(base_ckpt.path, base_ckpt.config_json()),
        "policy": policy.to_dict(),
        "entries": entries,
        "from_base": plan.from_base,
        "key_map": {"finetuned_prefix": match.finetuned_prefix, "base_prefix": match.base_prefix},
        "base_fingerprint": fingerprint,
        "base_fingerprint_algorithm": CHUNKED,
        "model_config": ft_ckpt.config_json(),
    }


def _fixed_header_bytes(method: str, codec: Method, policy: TensorPolicy, plan: Plan, match,
                        ft_ckpt: CheckpointReader, base_ckpt: CheckpointReader) -> int:
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
    header = _header(method, codec, policy, entries, plan, match, "0" * 64, ft_ckpt, base_ckpt)
    header["content_sha256"] = "0" * 64
    return len(json.dumps(canonical_json(header))) + len(json.dumps(index))


def _check_finite(tensor: torch.Tensor, name: str, where: Any) -> None:
    if tensor.is_floating_point() and not bool(surely_finite(tensor)):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"tensor {name!r} in {where} has {bad} NaN/Inf value(s)")


def _reader(checkpoint: PathLike | CheckpointReader) -> CheckpointReader:
    return checkpoint if isinstance(checkpoint, CheckpointReader) else open_checkpoint(checkpoint)


def _input_paths(*checkpoints: PathLike | CheckpointReader) -> tuple[PathLike, ...]:
    """Where the inputs live, so an output never lands on (or inside, or around) one of them."""
    return tuple(c.path if isinstance(c, CheckpointReader) else c for c in checkpoints)


def _stream_deltas(base: CheckpointReader, finetuned: CheckpointReader, pairs: dict[str, str], names: list[str],
                   device: torch.device, checks: LaggedChecks) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, base tensor on the host, float32 delta on the device)``, read ahead in worker threads.

    Every delta is checked for NaN/Inf (a non-finite input gives a non-finite delta) through
    ``checks``; the error names the input at fault.
    """
    pin = device.type == "cuda"
    # base and fine-tuned tensors are separate reads, so the two halves of a layer arrive in parallel
    reads = [(reader, key) for name in names for reader, key in ((base, pairs[name]), (finetuned, name))]
    tensors = prefetch(lambda read: read[0].get(read[1], pin_memory=pin), reads)
    for name, b, f in zip(names, tensors, tensors, strict=True):
        delta = delta_of(f, b, device)
        checks.add(surely_finite(delta), lambda name=name: _name_nonfinite(base, finetuned, pairs[name], name))
        yield name, b, delta


def _name_nonfinite(base: CheckpointReader, finetuned: CheckpointReader, bname: str, name: str) -> None:
    """Raise the NonFiniteError for a non-finite delta: which input holds NaN/Inf, or the overflow."""
    _check_finite(base.get(bname), bname, base.path)
    _check_finite(finetuned.get(name), name, finetuned.path)
    raise NonFiniteError(f"tensor {name!r}: finetuned − base overflows float32 ({finetuned.path} − {base.path})")


def compress(base: PathLike | CheckpointReader, finetuned: PathLike | CheckpointReader,
             method: str | Method | MethodConfig = "deltadct", out: PathLike | None = None, *,
             device: str | torch.device = "cpu", policy: TensorPolicy | Mapping[str, Any] | None = None,
             progress: bool = True, overwrite: bool = False, record_errors: bool = True,
             calibration: Mapping[str, torch.Tensor] | None = None, **method_config: Any) -> DeltaFile:
    """Compress ``finetuned − base`` with a registered method; write it to ``out`` if given.

    ``method`` is a registered name (options as keywords), a method's config object
    (``get_method_class("deltadct").Config(patch_size=32)``) or a ready :class:`Method`.
    ``calibration``: {fine-tuned tensor name: Hessian of that layer's inputs} for methods that need
    calibration data (``Method.needs_calibration``; :func:`deltadct.calibration.collect_hessians`).
    Everything that can be checked before reading weights is checked first (method name and options,
    policy, output path, key sets and shapes), so a bad call fails fast and writes nothing.
    ``base``/``finetuned`` may also be open :class:`CheckpointReader` objects (reused across calls).
    """
    codec = create_method(method, method_config or None)
    method = codec.name
    policy = _as_policy(policy)
    dev = resolve_device(device)
    if out is not None:
        check_output_path(out, overwrite=overwrite, inputs=_input_paths(base, finetuned))
    base_ckpt, ft_ckpt = _reader(base), _reader(finetuned)
    match, plan = plan_tensors(base_ckpt, ft_ckpt, codec, policy)
    if codec.needs_calibration:
        uncovered = [name for name in plan.compressed if name not in (calibration or {})]
        if uncovered:
            raise ConfigError(f"method {method!r} needs calibration data (layer-input Hessians) for every compressed "
                              f"tensor; {len(uncovered)} have none, e.g. {uncovered[:3]}: pass calibration= "
                              "(deltadct-run: calibration=task) or exclude them with policy.exclude")

    checks = LaggedChecks()

    if codec.needs_plan:
        codec.plan(((name, d) for name, _, d in _stream_deltas(base_ckpt, ft_ckpt, match.pairs, plan.compressed,
                                                               dev, checks)),
                   header_bytes=_fixed_header_bytes(method, codec, policy, plan, match, ft_ckpt, base_ckpt))
        checks.drain()

    spool_dir = None if out is None else (Path(out).parent if str(Path(out).parent) else Path("."))
    writer = SafetensorsWriter(spool_dir)
    background = BackgroundWriter(writer.add)
    try:
        entries: dict[str, dict] = {}
        errors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # read once everything is written
        with BaseFingerprint() as fingerprint:
            try:
                bar = tqdm(_stream_deltas(base_ckpt, ft_ckpt, match.pairs, plan.compressed, dev, checks),
                           total=len(plan.compressed), desc=f"compress [{method}]", unit="tensor",
                           disable=not progress)
                for name, b, delta in bar:
                    packed = codec.compress(delta, name=name, **(
                        {"hessian": calibration[name].to(dev)} if codec.needs_calibration else {}))
                    entry = {"kind": "compressed", "shape": list(delta.shape),
                             "dtype": dtype_name(ft_ckpt.dtype(name)), "fields": sorted(packed.tensors),
                             "bytes": packed.payload_bytes}
                    if packed.meta:
                        entry["meta"] = packed.meta
                    if record_errors:
                        errors[name] = relative_error(delta, codec.reconstruct(packed, tuple(delta.shape)))
                    for field in entry["fields"]:
                        background.put(tensor_name(name, field), packed.tensors[field])
                    entries[name] = entry
                    fingerprint.update(match.pairs[name], b)
            except Exception:
                checks.drain()  # a NaN in the input is the error to report, not what the codec made of it
                raise
            checks.drain()
            stored = [(kind, name) for kind, names in (("kept", plan.kept), ("new", plan.new)) for name in names]
            for (kind, name), value in zip(stored, prefetch(ft_ckpt.get, [n for _, n in stored]), strict=True):
                _check_finite(value, name, ft_ckpt.path)
                background.put(tensor_name(name, VALUE_FIELD), value)
                entries[name] = {"kind": kind, "shape": list(value.shape), "dtype": dtype_name(value.dtype),
                                 "fields": [VALUE_FIELD], "bytes": value.numel() * value.element_size()}
            background.finish()
            base_fingerprint = fingerprint.hexdigest()
        for name, (err, norm) in errors.items():
            entries[name]["rel_error"] = rounded_relative_error(err, norm)
        header = finalize_header(_header(method, codec, policy, entries, plan, match, base_fingerprint, ft_ckpt,
                                         base_ckpt),
                                 writer)
        if out is None:
            return in_memory(header, writer)
        with atomic_path(out, overwrite=overwrite, inputs=_input_paths(base, finetuned)) as tmp:
            writer.finish(tmp, {FORMAT_NAME: canonical_json(header)})
        return load(out, verify=False)
    finally:
        background.close()
        writer.close()


def _as_delta(delta: PathLike | DeltaFile) -> DeltaFile:
    return delta if isinstance(delta, DeltaFile) else load(delta)


def _base_name(header: dict, name: str) -> str:
    km = header.get("key_map", {})
    fp, bp = km.get("finetuned_prefix", ""), km.get("base_prefix", "")
    return bp + name[len(fp):]


def _check_base_shapes(ckpt: CheckpointReader, dfile: DeltaFile) -> None:
    """Every base tensor the delta needs exists with the recorded shape (checked before any read)."""
    header, where = dfile.header, dfile.path or "the delta"
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


def _output_names(dfile: DeltaFile) -> list[str]:
    return list(dfile.entries) + list(dfile.header.get("from_base", []))


def _output_specs(ckpt: CheckpointReader, dfile: DeltaFile) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor an applied checkpoint holds, in file order."""
    specs = []
    for name in _output_names(dfile):
        entry = dfile.entries.get(name)
        if entry is None:
            bname = _base_name(dfile.header, name)
            specs.append((name, ckpt.dtype(bname), tuple(ckpt.shape(bname))))
        else:
            specs.append((name, dtype_from_name(entry["dtype"]), tuple(entry["shape"])))
    return specs


def _applied(ckpt: CheckpointReader, dfile: DeltaFile, device: torch.device, progress: bool
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, reconstructed tensor)`` on ``device`` (taken-from-base and kept tensors on the host),
    base tensors read ahead in worker threads and fingerprinted in the background; the fingerprint
    is checked after the last tensor."""
    header = dfile.header
    where = dfile.path or "the delta"
    _check_base_shapes(ckpt, dfile)
    algorithm = algorithm_of(header)
    names = _output_names(dfile)
    pin = device.type == "cuda"
    checks = LaggedChecks()

    def read(name: str):
        entry = dfile.entries.get(name)
        if entry is not None and entry["kind"] != "compressed":
            return None  # stored in the delta file: read where it is used
        return ckpt.get(_base_name(header, name), pin_memory=pin and entry is not None)

    def undecodable(name: str) -> None:
        raise FormatError(f"{where}: entry {name!r} does not decode to a finite tensor of shape "
                          f"{dfile.entries[name]['shape']}")

    with BaseFingerprint(algorithm) as fingerprint:
        for name, b in tqdm(zip(names, prefetch(read, names), strict=True), total=len(names), desc="apply",
                            unit="tensor", disable=not progress):
            entry = dfile.entries.get(name)
            if entry is None:  # left to the base by the policy
                yield name, b
            elif entry["kind"] == "compressed":
                fingerprint.update(_base_name(header, name), b)
                approx = dfile.reconstruct(name, device, check_finite=False)
                checks.add(surely_finite(approx), lambda name=name: undecodable(name))
                yield name, (approx + to_device(b, device)).to(dtype_from_name(entry["dtype"]))
            else:
                yield name, dfile.value(name)
        checks.drain()
        if fingerprint.hexdigest() != header["base_fingerprint"]:
            raise FingerprintMismatchError(f"{ckpt.path} is not the base {where} was made from "
                                           "(base fingerprint mismatch)")


def iter_applied(base: PathLike | CheckpointReader, delta: PathLike | DeltaFile, *,
                 device: str | torch.device = "cpu", progress: bool = False):
    """Yield ``(fine-tuned name, reconstructed tensor)`` one at a time, then check the base fingerprint.

    Raises :class:`FingerprintMismatchError` (after the last tensor, before the caller commits anything)
    when the base is not the one the delta was made from. Shapes are checked up front.
    """
    dfile = _as_delta(delta)
    dev = resolve_device(device)
    for name, tensor in _applied(_reader(base), dfile, dev, progress):
        yield name, tensor.cpu()


def apply(base: PathLike | CheckpointReader, delta: PathLike | DeltaFile, out: PathLike | None = None, *,
          device: str | torch.device = "cpu", progress: bool = True, overwrite: bool = False
          ) -> dict[str, torch.Tensor] | Path:
    """Reconstruct the fine-tuned weights from ``base`` + ``delta``.

    Without ``out`` returns the state dict (fine-tuned tensor names). With ``out`` writes a model
    directory: ``model.safetensors`` plus the base directory's tokenizer/processor files and the
    fine-tuned ``config.json`` recorded in the delta, so ``from_pretrained`` (or the loader used for the
    base) opens it. The directory appears only once complete and verified. The file's index is
    known from the delta's header, so its header is written first and every tensor once, in place.
    """
    dfile = _as_delta(delta)
    if out is None:
        return dict(iter_applied(base, dfile, device=device, progress=progress))
    dev = resolve_device(device)
    inputs = (*_input_paths(base), dfile.path)
    check_output_path(out, overwrite=overwrite, inputs=inputs, is_dir=True)
    ckpt = _reader(base)
    _check_base_shapes(ckpt, dfile)
    where = dfile.path or "the delta"
    with atomic_path(out, is_dir=True, overwrite=overwrite, inputs=inputs) as tmp:
        writer = PlannedSafetensorsWriter(tmp / "model.safetensors", _output_specs(ckpt, dfile), {"format": "pt"})

        def write(name: str, tensor: torch.Tensor) -> None:
            try:
                writer.add(name, tensor)
            except ValueError as err:  # a stored tensor that is not what the header says
                raise FormatError(f"{where}: {err}") from None

        background = BackgroundWriter(write, threads=reader_threads())
        try:
            for name, tensor in _applied(ckpt, dfile, dev, progress):
                background.put(name, tensor)
            background.finish()
            writer.finish()
        finally:
            background.close()
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
        names = []
        for name, entry in header["entries"].items():
            if entry["kind"] != "compressed":
                continue
            bname = _base_name(header, name)
            if bname not in ckpt or list(ckpt.shape(bname)) != list(entry["shape"]):
                raise FingerprintMismatchError(f"{base} is not the base {path} was made from "
                                               f"(tensor {bname!r} absent or of another shape)")
            names.append(bname)
        with BaseFingerprint(algorithm_of(header)) as fingerprint:
            for bname, tensor in zip(names, prefetch(ckpt.get, names), strict=True):
                fingerprint.update(bname, tensor)
            if fingerprint.hexdigest() != header["base_fingerprint"]:
                raise FingerprintMismatchError(f"{base} is not the base {path} was made from (fingerprint mismatch)")
        report["fingerprint"] = "ok"
    return report


__all__ = ["compress", "apply", "reconstruct", "save", "load", "info", "verify", "iter_applied",
           "plan_tensors", "DeltaFile", "TensorPolicy", "ShapeMismatchError"]
