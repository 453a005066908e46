"""Model adapters: registry, strict rebuild from a state dict, save/load round trips, BEiT-3 state dicts."""
from __future__ import annotations

import pytest
import torch

import deltadct
from deltadct.adapters import AdapterError, get_adapter, list_adapters
from deltadct.checkpoints import open_checkpoint
from deltadct.errors import CheckpointError, ConfigError, KeyMismatchError, ShapeMismatchError


def test_registry_lists_every_family():
    assert list_adapters() == ["beit3_state_dict", "hf_causal_lm", "hf_seqcls", "hf_t5", "hf_vit", "timm_vit"]
    assert get_adapter("hf_seqcls").policy_defaults == {"extra_keys": "keep", "missing_keys": "ignore"}
    with pytest.raises(ConfigError, match="unknown model adapter 'bert'.*hf_seqcls"):
        get_adapter("bert")


# ------------------------------------------------------------------ Hugging Face (a tiny local BERT)

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    path = get_adapter("hf_seqcls").save(model, tmp_path_factory.mktemp("bert") / "ft")
    return path, model


def test_hf_load_with_state_dict_gives_the_same_model(tiny_bert):
    path, model = tiny_bert
    adapter = get_adapter("hf_seqcls")
    state = {k: v + 0.01 for k, v in open_checkpoint(path).items()}
    rebuilt = adapter.load_with_state_dict(path, state)
    assert type(rebuilt) is type(model) and not rebuilt.training
    for name, value in rebuilt.state_dict().items():
        if name in state:
            torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    x = adapter.example_inputs(rebuilt, None, num=2, seed=0)
    torch.testing.assert_close(adapter.logits(adapter.load(path), x), model(**x).logits)


@pytest.mark.parametrize("change,error,message", [
    (lambda s: s.pop("classifier.weight"), KeyMismatchError, "missing from the state dict: classifier.weight"),
    (lambda s: s.update(extra=torch.zeros(2)), KeyMismatchError, "do not belong to .*: extra"),
    (lambda s: s.update({"classifier.weight": torch.zeros(2, 32)}), ShapeMismatchError,
     r"'classifier.weight' has shape \[2, 32\] in the state dict but \[3, 32\]"),
])
def test_hf_load_with_state_dict_is_strict(tiny_bert, change, error, message):
    path, _ = tiny_bert
    state = dict(open_checkpoint(path).items())
    change(state)
    with pytest.raises(error, match=message):
        get_adapter("hf_seqcls").load_with_state_dict(path, state)


def test_hf_missing_checkpoint_and_tokenizer(tiny_bert, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        get_adapter("hf_seqcls").load(tmp_path / "nope")
    assert get_adapter("hf_seqcls").load_processor(tiny_bert[0]) is None  # saved without a tokenizer


# ------------------------------------------------------------------ timm

@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=8, patch_size=4,
                              in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    return get_adapter("timm_vit").save(model, tmp_path_factory.mktemp("timm") / "ft"), model


def test_timm_round_trip_and_transform(tiny_timm):
    from PIL import Image

    path, model = tiny_timm
    adapter = get_adapter("timm_vit")
    loaded = adapter.load(path)
    x = adapter.example_inputs(loaded, None, num=3, seed=1)
    assert x["x"].shape == (3, 1, 8, 8)
    torch.testing.assert_close(adapter.logits(loaded, x), model(x["x"]))
    pixels = adapter.load_processor(path)(Image.new("L", (8, 8), color=255))
    assert pixels.shape == (1, 8, 8)
    # timm's default normalisation for this architecture: (1 - 0.5) / 0.5
    torch.testing.assert_close(pixels, torch.ones(1, 8, 8))


def test_timm_load_with_state_dict_is_strict(tiny_timm):
    path, _ = tiny_timm
    adapter = get_adapter("timm_vit")
    state = dict(open_checkpoint(path).items())
    rebuilt = adapter.load_with_state_dict(path, state)
    torch.testing.assert_close(rebuilt.head.weight, state["head.weight"])
    with pytest.raises(ShapeMismatchError, match=r"'head.weight' has shape \[5, 32\]"):
        adapter.load_with_state_dict(path, {**state, "head.weight": torch.zeros(5, 32)})
    with pytest.raises(KeyMismatchError, match="missing from the state dict: head.bias"):
        adapter.load_with_state_dict(path, {k: v for k, v in state.items() if k != "head.bias"})


# ------------------------------------------------------------------ BEiT-3 state dicts

def beit3_state(dim: int = 64, ffn: int = 128, layers: int = 2, vocab: int = 96, patch: int = 4, seed: int = 0,
                head: int | None = None) -> dict[str, torch.Tensor]:
    """A scaled-down state dict with the public BEiT-3 parameter names (torchscale multiway encoder:
    A = vision expert, B = language expert) and their shapes relative to the model width."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    state = {
        "beit3.text_embed.weight": r(vocab, dim),
        "beit3.vision_embed.proj.weight": r(dim, 3, patch, patch),
        "beit3.vision_embed.proj.bias": r(dim),
        "beit3.vision_embed.cls_token": r(1, 1, dim),
        "beit3.vision_embed.mask_token": r(1, 1, dim),
        "beit3.encoder.embed_positions.A.weight": r(19, dim),
        "beit3.encoder.embed_positions.B.weight": r(66, dim),
    }
    for i in range(layers):
        pre = f"beit3.encoder.layers.{i}"
        for expert in "AB":
            for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                state[f"{pre}.self_attn.{proj}.{expert}.weight"] = r(dim, dim)
                state[f"{pre}.self_attn.{proj}.{expert}.bias"] = r(dim)
            for norm in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                state[f"{pre}.{norm}.{expert}.weight"] = 1 + r(dim)
            state[f"{pre}.ffn.{expert}.ffn_layernorm.weight"] = 1 + r(ffn)
            state[f"{pre}.ffn.{expert}.fc1.weight"] = r(ffn, dim)
            state[f"{pre}.ffn.{expert}.fc1.bias"] = r(ffn)
            state[f"{pre}.ffn.{expert}.fc2.weight"] = r(dim, ffn)
            state[f"{pre}.ffn.{expert}.fc2.bias"] = r(dim)
    if head is not None:  # a task head of a fine-tuned checkpoint (e.g. VQAv2 / NLVR2 classifiers)
        state["head.weight"], state["head.bias"] = r(head, dim), r(head)
    return state


def test_beit3_state_dict_compress_apply_round_trip(tmp_path):
    base = beit3_state(seed=0)
    drift = beit3_state(seed=1)
    finetuned = {k: v + 0.2 * drift[k] for k, v in base.items()}
    finetuned.update({k: v for k, v in beit3_state(seed=2, head=3).items() if k.startswith("head.")})
    torch.save({"model": base, "args": {"model": "beit3_base_patch16_224"}}, tmp_path / "base.pth")
    torch.save({"model": finetuned}, tmp_path / "finetuned.pth")

    adapter = get_adapter("beit3_state_dict")
    delta = deltadct.compress(tmp_path / "base.pth", tmp_path / "finetuned.pth", "deltadct",
                              out=tmp_path / "ft.delta.safetensors", policy=adapter.policy_defaults,
                              progress=False, patch_size=16)
    info = delta.info()
    assert info["method"] == "deltadct" and 0 < info["bits_per_param"] < 8  # far below fp32
    state = deltadct.apply(tmp_path / "base.pth", tmp_path / "ft.delta.safetensors", progress=False)
    assert set(state) == set(finetuned)
    model = adapter.load_with_state_dict(tmp_path / "finetuned.pth", state)
    for name in ("head.weight", "beit3.text_embed.weight", "beit3.encoder.layers.0.self_attn_layer_norm.B.weight"):
        torch.testing.assert_close(model.state_dict()[name], finetuned[name], rtol=0, atol=0)  # stored exactly
    for name in ("beit3.encoder.layers.1.self_attn.k_proj.A.weight", "beit3.encoder.layers.0.ffn.B.fc1.weight"):
        delta_true = finetuned[name] - base[name]
        error = torch.linalg.norm(state[name] - finetuned[name]) / torch.linalg.norm(delta_true)
        assert 0 < error < 1  # compressed: lossy, but much closer than the base

    from eval import EvalContext, get_evaluator

    reference = adapter.load(tmp_path / "finetuned.pth")
    metrics = get_evaluator("reconstruction")().evaluate(model, EvalContext("vqa", {}, adapter="beit3_state_dict",
                                                                            reference=reference))
    assert 0 < metrics["rel_error"] < 1 and "logit_kl" not in metrics  # no model code: weights only

    saved = adapter.save(model, tmp_path / "reconstructed.pth")
    reread = open_checkpoint(saved)
    assert set(reread.keys()) == set(finetuned)
    torch.testing.assert_close(reread.get("head.bias"), finetuned["head.bias"])


def test_beit3_state_dict_boundaries(tmp_path):
    state = beit3_state(layers=1)
    torch.save({"model": state}, tmp_path / "ft.pth")
    adapter = get_adapter("beit3_state_dict")
    model = adapter.load(tmp_path / "ft.pth")
    assert dict(model.named_parameters()).keys() == state.keys()
    with pytest.raises(AdapterError, match="needs the model code of the BEiT-3 repository"):
        model(torch.zeros(1))
    with pytest.raises(AdapterError, match="BEiT-3 repository"):
        adapter.example_inputs(model, None, num=1, seed=0)
    wrong = {**state, "beit3.text_embed.weight": torch.zeros(5, 64)}
    with pytest.raises(ShapeMismatchError, match="'beit3.text_embed.weight' has shape \\[5, 64\\]"):
        adapter.load_with_state_dict(tmp_path / "ft.pth", wrong)
    with pytest.raises(KeyMismatchError, match="missing from the state dict"):
        adapter.load_with_state_dict(tmp_path / "ft.pth", {k: v for k, v in state.items() if "fc1" not in k})


# ------------------------------------------------------------------ family knowledge evaluators ask for

def test_each_family_answers_for_its_own_models(tiny_bert, tiny_timm):
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    from deltadct.adapters import adapter_for
    from deltadct.adapters.beit3_state_dict import StateDictModel

    bert, vit = tiny_bert[1], tiny_timm[1]
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0)).eval()
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    beit3 = StateDictModel(beit3_state(layers=1))
    found = {name: adapter_for(model).name for name, model in
             {"bert": bert, "vit": vit, "t5": t5, "gpt": gpt, "beit3": beit3}.items()}
    assert found == {"bert": "hf_seqcls", "vit": "timm_vit", "t5": "hf_t5", "gpt": "hf_causal_lm",
                     "beit3": "beit3_state_dict"}
    assert [get_adapter(n).answers_by for n in ("hf_seqcls", "timm_vit", "hf_vit", "hf_t5", "hf_causal_lm")] == \
        ["classify", "classify", "classify", "generate", None]
    with pytest.raises(AdapterError, match="no registered model adapter handles a Linear"):
        adapter_for(torch.nn.Linear(2, 2))

    seqcls, timm_adapter, t5_adapter = get_adapter("hf_seqcls"), get_adapter("timm_vit"), get_adapter("hf_t5")
    assert seqcls.num_classes(bert) == 3 and timm_adapter.num_classes(vit) == 4
    assert timm_adapter.input_channels(vit) == 1
    pixels = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(timm_adapter.logits(vit, timm_adapter.pixel_inputs(pixels)), vit(pixels))
        # the zero-shot embedding: pooled features (32 wide) or, for a head as wide as the classes, its output
        assert timm_adapter.image_features(vit, pixels, 32).shape == (2, 32)
        torch.testing.assert_close(timm_adapter.image_features(vit, pixels, 4), vit(pixels))
        ids = torch.tensor([[3, 4, 5, 1]])
        answer = t5_adapter.generate(t5, {"input_ids": ids}, max_new_tokens=3)
        expected = t5.generate(input_ids=ids, max_new_tokens=3, do_sample=False, num_beams=1)
    torch.testing.assert_close(answer, expected)
    with pytest.raises(AdapterError, match="'hf_seqcls' does not generate text"):
        seqcls.generate(bert, {}, max_new_tokens=1)
    with pytest.raises(AdapterError, match="'hf_seqcls' does not take images"):
        seqcls.pixel_inputs(pixels)
