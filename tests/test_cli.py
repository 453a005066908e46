"""The ``deltadct`` command: compress / apply / info / verify / methods, and one-line errors on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltadct
from deltadct import cli

GLUE = Path(os.environ.get("DELTADCT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "glue"


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def compress_argv(base, ft, out, *extra):
    return ["compress", "--base", base, "--finetuned", ft, "--out", out, "--quiet", *extra]


# ---------------------------------------------------------------------------------------------
# a tiny BERT pair, saved with save_pretrained, fine-tuned on real SST-2 sentences
# ---------------------------------------------------------------------------------------------
def _sst2_batch(n: int, vocab: int, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``n`` SST-2 training sentences as word-hash token ids (no tokenizer files offline)."""
    import zlib

    lines = (GLUE / "sst2" / "train.tsv").read_text().splitlines()[1:n + 1]
    ids, labels = [], []
    for line in lines:
        sentence, label = line.rsplit("\t", 1)
        words = [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in sentence.split()][: length - 1]
        ids.append([1] + words + [0] * (length - 1 - len(words)))
        labels.append(int(label))
    return torch.tensor(ids), torch.tensor(labels)


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    root = tmp_path_factory.mktemp("bert")
    model.save_pretrained(root / "base")
    ids, labels = _sst2_batch(64, config.vocab_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(8):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=(ids > 0).long(), labels=labels).loss.backward()
        opt.step()
    model.save_pretrained(root / "finetuned")
    return root / "base", root / "finetuned", ids[:8]


def test_compress_apply_loads_with_from_pretrained(bert_pair, tmp_path, capsys):
    from transformers import AutoModel, AutoModelForSequenceClassification

    base, ft, ids = bert_pair
    delta, out = tmp_path / "ft.delta.safetensors", tmp_path / "applied"
    code, stdout, _ = run(compress_argv(base, ft, delta), capsys)
    assert code == 0 and "bits/param" in stdout
    code, stdout, _ = run(["apply", "--base", base, "--delta", delta, "--out", out, "--quiet"], capsys)
    assert code == 0 and (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    expected = deltadct.reconstruct(base, delta, progress=False)
    finetuned = load_file(ft / "model.safetensors")
    dfile = deltadct.load(delta)
    assert dfile.names("compressed") and dfile.names("kept")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    for name in dfile.names("kept"):  # embeddings, norms, biases, the classifier: exact
        assert torch.equal(state[name], finetuned[name]), name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    encoder = AutoModel.from_pretrained(out)  # the base loader takes the applied dir too
    assert torch.equal(encoder.state_dict()["encoder.layer.0.attention.self.query.weight"],
                       expected["bert.encoder.layer.0.attention.self.query.weight"])


def test_info_verify_methods(real_pair, tmp_path, capsys):
    delta = tmp_path / "d.safetensors"
    assert run(compress_argv(*real_pair, delta, "--set", "patch_size=8", "--set", "ratios=0.25,0.5,0.25"),
               capsys)[0] == 0
    code, stdout, _ = run(["info", delta, "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["method"] == "deltadct"
    assert info["num_params"] == 256 * 64 + 256 * 256 + 10 * 256  # the head too: 10 rows ≥ p=8
    assert info["file_bytes"] == delta.stat().st_size
    assert info["bits_per_param"] == (info["file_bytes"] - info["kept_bytes"]) * 8 / info["num_params"]
    assert info["config"]["patch_size"] == 8 and info["config"]["ratios"] == [0.25, 0.5, 0.25]
    code, stdout, _ = run(["info", delta], capsys)
    assert code == 0 and "bits_per_param" in stdout and "2.weight" in stdout
    code, stdout, _ = run(["verify", delta, "--base", real_pair[0]], capsys)
    assert code == 0 and "checksum=ok" in stdout and "fingerprint=ok" in stdout
    code, stdout, _ = run(["methods", "--json"], capsys)
    table = json.loads(stdout)
    assert code == 0 and table["deltadct"]["patch_size"] == 16 and "zero" in table


def test_console_script_subprocess(real_pair, tmp_path):
    delta = tmp_path / "d.safetensors"
    deltadct.compress(*real_pair, out=delta, progress=False)
    exe = Path(sys.executable).with_name("deltadct")
    proc = subprocess.run([str(exe), "info", str(delta), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {"method", "bits_per_param", "num_params"} <= set(json.loads(proc.stdout))
    proc = subprocess.run([str(exe), "info", str(tmp_path / "missing.safetensors")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("deltadct: error:") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# bad input: exit status 2, one line on stderr, nothing written
# ---------------------------------------------------------------------------------------------
def _edited_finetuned(real_pair, tmp_path, edit) -> Path:
    state = load_file(real_pair[1])
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, path)
    return path


def _nan(state):
    state["2.weight"][3, 5] = float("nan")


BAD_COMPRESS = {
    "shape mismatch": (lambda s: s.update({"2.weight": torch.zeros(256, 128)}), [], "shape"),
    "missing key": (lambda s: s.pop("2.bias"), [], "missing"),
    "extra key": (lambda s: s.update({"head.weight": torch.zeros(3, 3)}), [], "no counterpart"),
    "NaN in delta": (_nan, [], "NaN"),
    "patch larger than matrix": (None, ["--set", "patch_size=512", "--set", "policy.too_small=error"], "patch_size"),
    "patch_size zero": (None, ["--set", "patch_size=0"], "patch_size"),
    "patch_size not an integer": (None, ["--set", "patch_size=2.5"], "patch_size"),
    "ratios not summing to 1": (None, ["--set", "ratios=0.5,0.3,0.1"], "ratios"),
    "ratios over budget": (None, ["--set", "ratios=0.5,0.5,0"], "budget"),
    "unknown method": (None, ["--method", "jpeg9000"], "unknown method"),
    "GPTQ method without calibration data": (None, ["--method", "delta_come"], "needs calibration data"),
    "2:4 GPTQ method without calibration data": (None, ["--method", "deltazip"], "needs calibration data"),
}


def _assert_one_line_error(code, stdout, stderr, needle):
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltadct: error:"), stderr
    assert needle.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("case", sorted(BAD_COMPRESS))
def test_bad_compress_input(case, real_pair, tmp_path, capsys):
    edit, extra, needle = BAD_COMPRESS[case]
    ft = _edited_finetuned(real_pair, tmp_path, edit) if edit else real_pair[1]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_one_line_error(*run(compress_argv(real_pair[0], ft, out_dir / "d.safetensors", *extra), capsys), needle)
    assert list(out_dir.iterdir()) == []  # no output, no temp or spool file


@pytest.fixture
def good_delta(real_pair, tmp_path):
    path = tmp_path / "good.safetensors"
    deltadct.compress(*real_pair, out=path, progress=False)
    return path


def _truncated(path: Path) -> Path:
    bad = path.with_name("truncated.safetensors")
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return bad


def _flipped(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01  # inside the tensor data
    bad = path.with_name("flipped.safetensors")
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("damage,needle", [(_truncated, "truncated"), (_flipped, "checksum")])
@pytest.mark.parametrize("command", ["info", "verify", "apply"])
def test_damaged_delta_file(damage, needle, command, good_delta, real_pair, tmp_path, capsys):
    bad = damage(good_delta)
    out = tmp_path / "applied"
    argv = {"info": ["info", bad], "verify": ["verify", bad],
            "apply": ["apply", "--base", real_pair[0], "--delta", bad, "--out", out, "--quiet"]}[command]
    _assert_one_line_error(*run(argv, capsys), needle)
    assert not out.exists()


def test_apply_to_the_wrong_base(good_delta, real_pair, tmp_path, capsys):
    wrong = _edited_finetuned(real_pair, tmp_path, lambda s: s["2.weight"].add_(1e-3))  # same names and shapes
    wrong_base = wrong.rename(tmp_path / "other_base.safetensors")
    out = tmp_path / "applied"
    _assert_one_line_error(*run(["apply", "--base", wrong_base, "--delta", good_delta, "--out", out, "--quiet"],
                                capsys), "base")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    _assert_one_line_error(*run(["verify", good_delta, "--base", wrong_base], capsys), "fingerprint")
