"""The output guard and what it owns: the only calls that replace or remove files, stale temporaries,
atomic replacement of a directory deltadct wrote, and a closed stdout pipe."""
from __future__ import annotations

import ast
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import deltadct
import deltadct.io as dio
from deltadct import cli
from deltadct.errors import OutputError
from badinput.cases import finetune, weights, write_pair

PACKAGE = Path(deltadct.__file__).resolve().parent
#: calls that delete or rename over a path; ``str.replace`` takes two arguments, ``Path.replace`` one
_REMOVING = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("os", "unlink"), ("os", "remove"),
             ("os", "rmdir"), ("os", "removedirs"), ("shutil", "rmtree"), ("shutil", "move")}


def _removing_calls(tree: ast.AST) -> list[tuple[str, int]]:
    """(enclosing function, line) of every call in ``tree`` that can delete or replace a path."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            attr = node.func.attr
            if ((owner, attr) in _REMOVING or attr in ("unlink", "rmdir")
                    or (attr in ("replace", "rename") and owner not in ("os", "shutil") and len(node.args) == 1)):
                found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_one_function_owns_every_replace_and_remove_in_the_package():
    calls = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        for function, line in _removing_calls(ast.parse(file.read_text())):
            calls.setdefault(f"{file.relative_to(PACKAGE)}:{function}", []).append(line)
    assert list(calls) == ["io.py:_replace_or_remove"], calls
    assert len(calls["io.py:_replace_or_remove"]) >= 4  # rmtree, unlink, rename, replace: the scan sees them


def test_the_scan_finds_each_kind_of_call():
    source = ("def f(p):\n    os.replace(a, b)\n    shutil.rmtree(p)\n    p.unlink()\n    Path(p).replace(q)\n"
              "    os.remove(p)\n    'x'.replace('a', 'b')\n")
    assert [line for _, line in _removing_calls(ast.parse(source))] == [2, 3, 4, 5, 6]


def test_the_remover_refuses_anything_but_its_own_temporaries(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(OutputError, match="not a deltadct temporary"):
        dio._replace_or_remove(tmp_path / "precious.txt")
    with pytest.raises(OutputError, match="not a deltadct temporary"):
        dio._replace_or_remove(tmp_path / "precious.txt", onto=tmp_path / "other")
    assert (tmp_path / "precious.txt").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# temporaries left by killed runs
# ---------------------------------------------------------------------------------------------
def _age(path: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_stale_temporaries_are_removed_by_the_next_write_into_their_folder(tmp_path):
    base, ft = write_pair(tmp_path, weights(), finetune(weights()))
    out = tmp_path / "out"
    out.mkdir()
    stale_spool = out / ".deltadct-spool.k2x9_q0a.tmp"
    stale_dir = out / ".deltadct-model.a1b2c3d4.tmp"
    stale_spool.write_bytes(b"spooled tensors")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half a model")
    fresh = out / ".deltadct-d.safetensors.zzzzzzzz.tmp"  # newer than this process: not a killed run's
    fresh.write_bytes(b"")
    live = out / ".deltadct-spool.live0000.tmp"  # old, but a writer still holds its lock
    live.write_bytes(b"")
    others = [out / ".spool.abcdefgh.tmp", out / ".deltadct-output", out / "notes.tmp", out / ".deltadct-spool.tmp"]
    for path in [*others, stale_spool, stale_dir, live]:
        if not path.exists():
            path.write_text("not ours")
        _age(path)
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    dio._restart_clock()  # as a new process would: everything aged above predates it
    _age(fresh, -60)  # modified after the (re)start
    try:
        deltadct.compress(base, ft, out=out / "d.safetensors", progress=False)
    finally:
        os.close(holder)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["d.safetensors", fresh.name, live.name, *(p.name for p in others)])


def test_killed_runs_leave_only_names_of_the_temporary_pattern(tmp_path):
    """The temp names the writers use are the ones the sweep recognises (and nothing the user names)."""
    with dio.atomic_path(tmp_path / "d.safetensors") as tmp:
        assert dio.TEMP_NAME.match(tmp.name)
        tmp.write_bytes(b"x")
    with dio.atomic_path(tmp_path / "m", is_dir=True) as tmp:
        assert dio.TEMP_NAME.match(tmp.name)
    writer = dio.SafetensorsWriter(tmp_path)
    assert dio.TEMP_NAME.match(Path(writer._spool.name).name)
    writer.close()
    for user_name in ("d.safetensors", "m", ".deltadct-output", "notes.tmp", ".spool.x.tmp"):
        assert not dio.TEMP_NAME.match(user_name)


# ---------------------------------------------------------------------------------------------
# replacing a directory deltadct wrote
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", ["renameat2", "move_aside"])
def test_overwrite_replaces_a_directory_deltadct_wrote(tmp_path, monkeypatch, exchange):
    if exchange == "move_aside":  # a filesystem without RENAME_EXCHANGE
        monkeypatch.setattr(dio, "_exchange", lambda a, b: False)
    base, ft = write_pair(tmp_path, weights(), finetune(weights()))
    deltadct.compress(base, ft, out=tmp_path / "d.safetensors", progress=False)
    out = deltadct.apply(base, tmp_path / "d.safetensors", tmp_path / "model", progress=False)
    assert (out / dio.OUTPUT_MARKER).is_file()
    (out / "model.safetensors").write_bytes(b"stale")
    deltadct.apply(base, tmp_path / "d.safetensors", tmp_path / "model", progress=False, overwrite=True)
    assert load_file(out / "model.safetensors").keys() == weights().keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "d.safetensors", "ft.safetensors",
                                                          "model"]


def test_every_writer_goes_through_the_guard(tmp_path, monkeypatch):
    """Text, figures and saved in-memory deltas refuse the same outputs compress and apply refuse."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match="special file"):
        dio.atomic_write_text(tmp_path / "fifo", "table")
    monkeypatch.chdir(tmp_path)
    base, ft = write_pair(tmp_path, weights(), finetune(weights()))
    delta = deltadct.compress(base, ft, progress=False)
    with pytest.raises(OutputError, match="current directory"):
        delta.save(".", overwrite=True)
    (tmp_path / "records.jsonl").write_text("{}\n")
    with pytest.raises(OutputError, match="is an input"):
        dio.atomic_write_text(tmp_path / "records.jsonl", "x", inputs=(tmp_path / "records.jsonl",))
    assert (tmp_path / "records.jsonl").read_text() == "{}\n"


# ---------------------------------------------------------------------------------------------
# a reader that closes the pipe
# ---------------------------------------------------------------------------------------------
def test_closed_stdout_pipe_ends_quietly_with_sigpipe_status(tmp_path):
    """``deltadct info … | head``: no "Broken pipe" error, no traceback, status 141 as `yes | head` gives."""
    base, ft = write_pair(tmp_path, weights(), finetune(weights()))
    deltadct.compress(base, ft, out=tmp_path / "d.safetensors", progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "deltadct.cli", "info", str(tmp_path / "d.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the command writes a byte
    assert proc.wait(60) == cli.EXIT_BROKEN_PIPE == 141
    assert proc.stderr.read() == b""
