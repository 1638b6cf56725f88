"""The model: tower + heads shapes, normalisation, prefix tokens, CNN and NHWC towers, text
centring, logit init/clamp, parameter groups, local weights, errors, and the lr schedule."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from store.errors import InputError
from train.model import ModelConfig, build_model, lr_at

# A ViT with 1 CLS + 2 register tokens in front of 4×4 = 16 patch tokens.
TINY_VIT = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
    "reg_tokens": 2,
}
TEXT_DIM = 24


def _vit(**kw) -> ModelConfig:
    return ModelConfig(tower="vit_tiny_patch16_224", tower_kwargs=TINY_VIT, **kw)


def _images(size=32, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _unit_norm(x):
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]))


def _token_mlp_reference(head, tokens):
    """FLAME's head written out: per token Linear → GELU → Linear → LayerNorm, mean, L2."""
    per_token = head.norm(head.fc2(F.gelu(head.fc1(tokens))))
    return F.normalize(per_token.mean(dim=1), dim=-1)


@torch.no_grad()
def test_token_mlp_averages_patch_tokens_only():
    model = build_model(_vit(), TEXT_DIM).eval()
    x = _images()
    got = model.encode_image(x)
    assert got.shape == (2, TEXT_DIM)  # text head "none": images live in the LLM width
    _unit_norm(got)
    tokens = model.tower.forward_features(x)
    assert tokens.shape[1] == 3 + 16
    torch.testing.assert_close(got, _token_mlp_reference(model.image_head, tokens[:, 3:]))
    with_prefix = _token_mlp_reference(model.image_head, tokens)
    assert not torch.allclose(got, with_prefix, atol=1e-4)


@torch.no_grad()
def test_token_mlp_on_cnn_feature_map():
    model = build_model(ModelConfig(tower="resnet18"), TEXT_DIM).eval()
    x = _images(size=64)
    fmap = model.tower.forward_features(x)  # [B, 512, 2, 2]
    tokens = fmap.permute(0, 2, 3, 1).reshape(2, 4, 512)  # one token per spatial position
    got = model.encode_image(x)
    assert got.shape == (2, TEXT_DIM)
    torch.testing.assert_close(got, _token_mlp_reference(model.image_head, tokens))


@torch.no_grad()
def test_token_mlp_on_channels_last_tower():
    swin = {
        "img_size": 32,
        "embed_dim": 16,
        "depths": (1, 1),
        "num_heads": (1, 1),
        "window_size": 4,
    }
    model = build_model(ModelConfig("swin_tiny_patch4_window7_224", swin), TEXT_DIM).eval()
    x = _images()
    fmap = model.tower.forward_features(x)  # NHWC [B, 4, 4, 32]
    got = model.encode_image(x)
    torch.testing.assert_close(got, _token_mlp_reference(model.image_head, fmap.reshape(2, 16, 32)))


@pytest.mark.parametrize("image_head", ["linear", "mlp"])
@pytest.mark.parametrize("text_head", ["linear", "adapter"])
@torch.no_grad()
def test_pooled_image_heads_and_text_heads_meet_in_embed_dim(image_head, text_head):
    model = build_model(_vit(image_head=image_head, text_head=text_head, embed_dim=16), TEXT_DIM)
    model.eval()
    x = _images()
    img = model.encode_image(x)
    assert img.shape == (2, 16)
    _unit_norm(img)
    if image_head == "linear":
        pooled = model.tower.forward_head(model.tower.forward_features(x), pre_logits=True)
        torch.testing.assert_close(img, F.normalize(model.image_head(pooled), dim=-1))
    vectors = torch.randn(3, 5, TEXT_DIM)  # [N, S, text_dim]
    txt = model.encode_text(vectors)
    assert txt.shape == (3, 5, 16)
    _unit_norm(txt)
    torch.testing.assert_close(txt.reshape(15, 16), model.encode_text(vectors.reshape(15, -1)))


@torch.no_grad()
def test_text_head_none_is_normalised_identity_and_adapter_ignores_scale():
    v = torch.randn(4, TEXT_DIM).half()  # caches store float16
    none = build_model(_vit(), TEXT_DIM)
    torch.testing.assert_close(none.encode_text(v), F.normalize(v.float(), dim=-1))
    adapter = build_model(_vit(text_head="adapter", embed_dim=8, adapter_blocks=2), TEXT_DIM)
    assert len(adapter.text_head.blocks) == 2
    # LLM2CLIP L2-normalises the cached vector first, so its length does not matter
    torch.testing.assert_close(adapter.encode_text(v), adapter.encode_text(3 * v.float()))


@torch.no_grad()
def test_center_text_subtracts_the_mean():
    v, mean = torch.randn(4, TEXT_DIM), torch.randn(TEXT_DIM)
    model = build_model(_vit(center_text=True), TEXT_DIM)
    model.set_text_mean(mean)
    torch.testing.assert_close(model.encode_text(v), F.normalize(v - mean, dim=-1))
    assert torch.equal(model.state_dict()["text_mean"], mean)  # saved with the checkpoint
    off = build_model(_vit(center_text=False), TEXT_DIM)
    off.set_text_mean(mean)
    torch.testing.assert_close(off.encode_text(v), F.normalize(v, dim=-1))
    with pytest.raises(ValueError, match="shape"):
        model.set_text_mean(torch.zeros(TEXT_DIM + 1))


def test_logit_init_per_loss_and_clamp():
    sig = build_model(_vit(loss="mp-sigmoid"), TEXT_DIM)
    assert sig.logit_scale.item() == pytest.approx(math.log(10))
    assert sig.logit_bias.item() == -10
    clip = build_model(_vit(loss="clip"), TEXT_DIM)
    assert clip.logit_scale_value().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert clip.logit_bias is None
    with torch.no_grad():
        clip.logit_scale.fill_(8.0)  # e^8 ≈ 2981
    assert clip.logit_scale_value().item() == pytest.approx(100.0, rel=1e-5)
    out = sig(_images(), torch.randn(2, 3, TEXT_DIM))
    assert out["image_features"].shape == (2, TEXT_DIM)
    assert out["text_features"].shape == (2, 3, TEXT_DIM)
    assert out["logit_scale"].item() == pytest.approx(10.0, rel=1e-5)
    assert out["logit_bias"] is sig.logit_bias


def test_param_groups_exempt_one_dim_params_from_weight_decay():
    model = build_model(_vit(text_head="adapter", embed_dim=8, adapter_blocks=1), TEXT_DIM)
    decay, no_decay = model.param_groups(0.5)
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay).isdisjoint(ids(no_decay))
    assert ids(decay) | ids(no_decay) == {id(p) for p in model.parameters()}
    named = dict(model.named_parameters())
    for name in ("logit_scale", "logit_bias", "image_head.fc1.bias", "image_head.norm.weight"):
        assert id(named[name]) in ids(no_decay), name
    assert id(named["image_head.fc1.weight"]) in ids(decay)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])
    torch.optim.AdamW(model.param_groups(0.5), lr=1e-3, betas=(0.9, 0.95))


def test_grad_checkpointing_is_forwarded_to_timm():
    model = build_model(_vit(grad_checkpointing=True), TEXT_DIM)
    assert model.tower.grad_checkpointing
    model(_images(), torch.randn(2, 2, TEXT_DIM))["image_features"].sum().backward()
    assert model.tower.patch_embed.proj.weight.grad is not None
    model.set_grad_checkpointing(False)
    assert not model.tower.grad_checkpointing


def test_pretrained_path_loads_local_weights_and_drops_the_classifier(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY_VIT)
    path = tmp_path / "tower.safetensors"
    save_file(source.state_dict(), str(path))  # includes head.weight / head.bias
    model = build_model(_vit(pretrained_path=str(path)), TEXT_DIM)
    for k, v in model.tower.state_dict().items():
        torch.testing.assert_close(v, source.state_dict()[k])
    with pytest.raises(InputError, match="not found"):
        build_model(_vit(pretrained_path=str(tmp_path / "nope.pth")), TEXT_DIM)


def test_user_errors_name_the_fix():
    with pytest.raises(InputError, match="vit_tiny_patch16_224"):
        build_model(ModelConfig(tower="vit_tiny_patch16_2244"), TEXT_DIM)
    with pytest.raises(InputError, match="tower_kwargs"):
        build_model(ModelConfig(tower="resnet18", tower_kwargs={"depth_of_field": 3}), TEXT_DIM)
    with pytest.raises(InputError, match="image_head"):
        build_model(_vit(image_head="cls"), TEXT_DIM)


def test_lr_at_warmup_then_cosine():
    lr = lambda step, **kw: lr_at(step, total=110, warmup=10, base_lr=1.0, **kw)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)  # warm-up starts above 0 so step 0 trains
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr(60) == pytest.approx(0.5)  # half-way through the decay
    assert lr(110) == 0.0 and lr(500) == 0.0
    assert lr(110, min_lr=0.1) == 0.1 and lr(60, min_lr=0.1) == pytest.approx(0.55)
    decay = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(0, total=5, warmup=0, base_lr=2.0) == 2.0
