"""ViT backbones (arcface_torch's vit_t/s/b/l), gradient checkpointing, and the WebFace42M ViT-T recipe.

The insightface side is described here independently of facerec/backbones/vit.py: the names and
shapes of its state_dict, and its forward pass re-written with torch.nn.functional from
recognition/arcface_torch/backbones/vit.py (deepinsight/insightface commit 5ef9804).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.profiler import ProfilerActivity, profile

from conftest import compose_config
from facerec.backbones import base, build, list_backbones, vit
from facerec.backbones.iresnet import IResNet
from facerec.backbones.vit import VisionTransformer
from facerec.training.fit import build_module

# arcface_torch's get_model: embed_dim, depth (num_heads 8, 9x9 patches, MLP ratio 4 for all),
# drop_path_rate, mask_ratio ("vit_l" is its vit_l_dp005_mask_005, the only ViT-L it has).
INSIGHTFACE_VITS = {
    "vit_t": (256, 12, 0.1, 0.1),
    "vit_s": (512, 12, 0.1, 0.1),
    "vit_b": (512, 24, 0.1, 0.1),
    "vit_l": (768, 24, 0.05, 0.05),
}
TINY = dict(embed_dim=32, depth=2, num_heads=4)  # 144 tokens of width 32


def insightface_vit_keys(embed_dim: int, depth: int, embedding_size: int = 512) -> list[tuple[str, tuple]]:
    """arcface_torch's VisionTransformer state_dict, in its order: the model's own parameters
    (pos_embed, created first, then mask_token), then its submodules as created: patch_embed.proj
    (9x9 conv with bias), each block's norm1 and norm2 (both before attn), attn.qkv (no bias) and
    attn.proj, mlp.fc1 and mlp.fc2; the final norm; feature = Linear, BN, Linear, BN (no biases)."""
    tokens, dim, hidden = (112 // 9) ** 2, embed_dim, 4 * embed_dim

    def batchnorm(prefix: str, n: int) -> list[tuple[str, tuple]]:
        return [(f"{prefix}.{name}", (n,)) for name in ("weight", "bias", "running_mean", "running_var")] + [
            (f"{prefix}.num_batches_tracked", ())
        ]

    keys = [("pos_embed", (1, tokens, dim)), ("mask_token", (1, 1, dim))]
    keys += [("patch_embed.proj.weight", (dim, 3, 9, 9)), ("patch_embed.proj.bias", (dim,))]
    for i in range(depth):
        block = f"blocks.{i}"
        keys += [(f"{block}.{norm}.{p}", (dim,)) for norm in ("norm1", "norm2") for p in ("weight", "bias")]
        keys += [(f"{block}.attn.qkv.weight", (3 * dim, dim)), (f"{block}.attn.proj.weight", (dim, dim))]
        keys += [(f"{block}.attn.proj.bias", (dim,))]
        keys += [(f"{block}.mlp.fc1.weight", (hidden, dim)), (f"{block}.mlp.fc1.bias", (hidden,))]
        keys += [(f"{block}.mlp.fc2.weight", (dim, hidden)), (f"{block}.mlp.fc2.bias", (dim,))]
    keys += [("norm.weight", (dim,)), ("norm.bias", (dim,)), ("feature.0.weight", (dim, tokens * dim))]
    keys += batchnorm("feature.1", dim) + [("feature.2.weight", (embedding_size, dim))]
    return keys + batchnorm("feature.3", embedding_size)


def insightface_state_dict(keys, dtype=torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values of the described names and shapes, with fan-in-scaled matrices and
    non-trivial norms and BN statistics, so every entry changes the output."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator, dtype=dtype)
        elif len(shape) >= 2 and key not in ("pos_embed", "mask_token"):
            state[key] = torch.randn(shape, generator=generator, dtype=dtype) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator, dtype=dtype)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator, dtype=dtype)
    return state


def timm_drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    # timm's DropPath (insightface's uses an nn.Identity where the rate is 0)
    if rate == 0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - rate)
    return x * keep.div_(1 - rate)


def insightface_forward(state, images, num_heads, depth, training=False, mask_ratio=0.0, drop_path_rate=0.0):
    """arcface_torch's VisionTransformer.forward (norm_layer "ln", no dropout), on a state_dict in its layout."""
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=9)
    x = x.flatten(2).transpose(1, 2) + state["pos_embed"]
    batch, length, dim = x.shape
    masking = training and mask_ratio > 0
    if masking:  # random_masking
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(batch, length), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, dim))
    rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]

    def linear(x, name):  # qkv and the feature Linears have no bias
        return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))

    def layer_norm(x, name):
        return F.layer_norm(x, (dim,), state[f"{name}.weight"], state[f"{name}.bias"])

    for i in range(depth):
        b = f"blocks.{i}"
        n = x.shape[1]
        qkv = linear(layer_norm(x, f"{b}.norm1"), f"{b}.attn.qkv").reshape(batch, n, 3, num_heads, dim // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // num_heads) ** -0.5).softmax(dim=-1)
        h = linear((attn @ v).transpose(1, 2).reshape(batch, n, dim), f"{b}.attn.proj")
        x = x + timm_drop_path(h, rates[i], training)
        h = linear(F.relu6(linear(layer_norm(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        x = x + timm_drop_path(h, rates[i], training)
    x = layer_norm(x, "norm")
    if masking:
        mask_tokens = state["mask_token"].repeat(batch, length - x.shape[1], 1)
        x = torch.gather(torch.cat([x, mask_tokens], dim=1), 1, ids_restore.unsqueeze(-1).repeat(1, 1, dim))
    x = x.reshape(batch, length * dim)
    for fc, bn in (("feature.0", "feature.1"), ("feature.2", "feature.3")):
        x = linear(x, fc)
        statistics = state[f"{bn}.running_mean"].clone(), state[f"{bn}.running_var"].clone()
        x = F.batch_norm(x, *statistics, state[f"{bn}.weight"], state[f"{bn}.bias"], training, 0.1, 2e-5)
    return x


def test_vit_t_s_b_l_are_registered_with_insightface_hyper_parameters():
    assert {"vit_t", "vit_s", "vit_b", "vit_l"} <= set(list_backbones())
    for name, (embed_dim, depth, drop_path_rate, mask_ratio) in INSIGHTFACE_VITS.items():
        with torch.device("meta"):
            model = build(name)
        assert (len(model.blocks), model.blocks[0].attn.num_heads) == (depth, 8)
        assert model.patch_embed.proj.kernel_size == model.patch_embed.proj.stride == (9, 9)
        assert model.blocks[-1].drop_path_rate == pytest.approx(drop_path_rate) and model.blocks[0].drop_path_rate == 0
        assert model.mask_ratio == mask_ratio and model.pos_embed.shape == (1, 144, embed_dim)


@pytest.mark.parametrize("name", list(INSIGHTFACE_VITS))
def test_state_dict_names_shapes_and_order_are_insightfaces(name):
    embed_dim, depth, _, _ = INSIGHTFACE_VITS[name]
    with torch.device("meta"):  # shapes only: ViT-L's 256 M parameters cost nothing
        model = build(name)
    expected = insightface_vit_keys(embed_dim, depth)
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == expected
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(p.numel() for p in model.parameters()) == sum(
        math.prod(shape) for key, shape in expected if not key.endswith(buffers)
    )


@pytest.mark.parametrize("training", [False, True])
def test_insightface_layout_weights_load_strictly_and_give_insightfaces_forward(training):
    """float64, tiny config; in training mode with masking and stochastic depth drawn from the same RNG stream."""
    options = dict(mask_ratio=0.25, drop_path_rate=0.3)
    model = VisionTransformer(**TINY, **options, embedding_size=16).double()
    state = insightface_state_dict(insightface_vit_keys(TINY["embed_dim"], TINY["depth"], embedding_size=16))
    model.load_state_dict(state, strict=True)
    model.train(training)
    images = torch.randn(3, 3, 112, 112, dtype=torch.float64)
    torch.manual_seed(7)
    ours = model(images)
    torch.manual_seed(7)
    reference = insightface_forward(state, images, TINY["num_heads"], TINY["depth"], training, **options)
    assert ours.shape == (3, 16)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    if training:  # masking and stochastic depth drew something: another seed gives other embeddings
        torch.manual_seed(8)
        assert not torch.allclose(model(images), ours)


def test_masking_keeps_insightfaces_token_count_in_training_only():
    model = VisionTransformer(**TINY, mask_ratio=0.1, drop_path_rate=0.0)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    images = torch.randn(2, 3, 112, 112)
    model.train()(images).square().sum().backward()  # (a plain sum through the training-mode BN has no gradient)
    with torch.no_grad():
        model.eval()(images)
    assert seen == [129, 144]  # insightface's len_keep = int(144 * (1 - 0.1)) in training; every token in eval
    assert model.mask_token.requires_grad and model.mask_token.grad.abs().sum() > 0
    # Without masking the token gets no gradient: frozen, so DDP does not wait for it (and AdamW skips it).
    assert not VisionTransformer(**TINY, mask_ratio=0.0).mask_token.requires_grad


def test_autocast_runs_the_blocks_in_bf16_and_the_embedding_layer_in_float32():
    model = VisionTransformer(**TINY, autocast="bf16").eval()
    dtypes = {}
    model.blocks[0].mlp.fc1.register_forward_hook(lambda _m, _i, out: dtypes.update(block=out.dtype))
    model.feature[0].register_forward_pre_hook(lambda _m, args: dtypes.update(embedding=args[0].dtype))
    with torch.no_grad():
        embeddings = model(torch.randn(2, 3, 112, 112))
    assert dtypes == {"block": torch.bfloat16, "embedding": torch.float32} and embeddings.dtype == torch.float32


def test_bad_vit_options_are_refused():
    with pytest.raises(ValueError, match="mask_ratio must lie in \\[0, 1\\), got 1.0"):
        build("vit_t", mask_ratio=1.0)
    with pytest.raises(ValueError, match="embed_dim must be a multiple of num_heads, got 30 and 4"):
        VisionTransformer(embed_dim=30, depth=1, num_heads=4)
    with pytest.raises(TypeError, match="'vit_t' has no option channels_last"):
        build("vit_t", channels_last=True)
    with pytest.raises(ValueError, match=r"takes \(B, 3, 112, 112\) images, got \(1, 3, 108, 108\)"):
        VisionTransformer(**TINY)(torch.randn(1, 3, 108, 108))


# ------------------------------------------------------------------------- gradient checkpointing
class SmallIResNet(IResNet):
    """IResNet-18 on 32x32 inputs (2x2 at the last stage): the same blocks at a fraction of the cost."""

    input_size = 32


def training_step_gradients(model: nn.Module, images: torch.Tensor, seed: int = 3) -> dict[str, torch.Tensor]:
    model.train().zero_grad()
    torch.manual_seed(seed)  # masking and stochastic depth: the same draws in both runs
    model(images).square().sum().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def checkpointing_pair(make):
    plain, checkpointed = make(False).double(), make(True).double()
    checkpointed.load_state_dict(plain.state_dict())
    return plain, checkpointed


MODELS = {
    "vit": (lambda ck: VisionTransformer(**TINY, mask_ratio=0.25, drop_path_rate=0.3, gradient_checkpointing=ck), 112),
    "iresnet18": (lambda ck: SmallIResNet(18, gradient_checkpointing=ck), 32),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointing_gives_the_same_gradients_and_batchnorm_statistics(name):
    make, size = MODELS[name]
    plain, checkpointed = checkpointing_pair(make)
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    expected, got = training_step_gradients(plain, images), training_step_gradients(checkpointed, images)
    assert list(got) == list(expected) and len(got) > 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12, msg=key)
    # Recomputation in backward runs each BatchNorm again: its statistics must be updated once.
    for (key, value), other in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=0, atol=0, msg=key)
    if name == "iresnet18":
        assert checkpointed.layer1[0].bn1.num_batches_tracked == 1


def memory_held_for_backward(model: nn.Module, images: torch.Tensor) -> int:
    """CPU memory allocated during a training forward and still allocated at its end (what autograd
    keeps for backward, plus the output), from the profiler's allocation and free events (the raw
    list: torch's FunctionEvents fold them into the ops)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        embeddings = model(images)
    held = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    embeddings.square().sum().backward()  # and backward runs
    return held


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointing_lowers_the_memory_held_for_backward(name):
    make, size = MODELS[name]
    images = torch.randn(4, 3, size, size)
    held = {ck: memory_held_for_backward(make(ck).train(), images) for ck in (False, True)}
    # Without: every block's activations wait for backward; with: each block's input only.
    assert 0 < held[True] < 0.5 * held[False], held


def test_checkpointing_is_off_in_eval(monkeypatch):
    calls = []
    monkeypatch.setattr(vit, "checkpointed", lambda block, tokens: calls.append(block) or block(tokens))
    model = VisionTransformer(**TINY, gradient_checkpointing=True)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        model.eval()(images)
    assert calls == []
    model.train()(images)
    assert calls == list(model.blocks)


def test_checkpointed_under_torch_compile_updates_batchnorm_once():
    """torch.compile refuses checkpoint's context_fn; compiled graphs recompute without mutating buffers."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()).double()
    eager = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()).double()
    eager.load_state_dict(block.state_dict())
    inputs = torch.randn(4, 8, dtype=torch.float64)
    compiled = torch.compile(lambda x: base.checkpointed(block, x), backend="aot_eager")
    compiled(inputs).square().sum().backward()
    eager(inputs).square().sum().backward()
    assert block[1].num_batches_tracked == 1
    torch.testing.assert_close(block[1].running_mean, eager[1].running_mean)
    torch.testing.assert_close(block[0].weight.grad, eager[0].weight.grad)


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", list(INSIGHTFACE_VITS))
def test_vit_model_configs_build_their_backbone(name, tmp_path):
    cfg = compose_config([f"model={name}"], tmp_path)
    assert cfg.model.embedding_size == 512 and cfg.model.gradient_checkpointing is False
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert isinstance(model, VisionTransformer) and model.mask_ratio == INSIGHTFACE_VITS[name][3]


@pytest.mark.parametrize("name", ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"])
def test_iresnet_configs_have_gradient_checkpointing(name, tmp_path):
    assert compose_config([f"model={name}"], tmp_path).model.gradient_checkpointing is False
    with torch.device("meta"):
        model = instantiate(compose_config([f"model={name}", "model.gradient_checkpointing=true"], tmp_path).model)
    assert model.gradient_checkpointing


def test_wf42m_vit_t_recipe_is_insightfaces(tmp_path):
    cfg = compose_config(["experiment=wf42m_vit_t"], tmp_path)
    model = cfg.model
    assert (model.name, model.drop_path_rate, model.mask_ratio, model.autocast) == ("vit_t", 0.05, 0.0, "bf16")
    assert (cfg.head._target_, cfg.head.m, cfg.scale.value) == ("facerec.heads.CosFace", 0.4, 64.0)
    assert (cfg.sharding._target_, cfg.sharding.sample_rate) == ("facerec.heads.PartialFC", 0.3)
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW"
    assert (cfg.optim.optimizer.lr, cfg.optim.optimizer.weight_decay) == (1e-3, 0.1)
    scheduler = cfg.optim.scheduler
    assert (scheduler.warmup_fraction, scheduler.decay, scheduler.power) == (0.1, "poly", 2.0)
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.max_epochs) == ("gpu", "bf16-mixed", 40)
    assert cfg.dataset.batch_size * cfg.trainer.accumulate_grad_batches == 512 * 8  # insightface's global batch
    assert cfg.dataset.train._target_ == "facerec.data.RecordDataset" and cfg.dataset.num_classes == 2_059_906
    assert OmegaConf.is_missing(cfg.dataset.train, "root")  # WebFace42M's folder is the user's to give
    ddp = compose_config(["experiment=wf42m_vit_t", "trainer=ddp", "trainer.accumulate_grad_batches=1"], tmp_path)
    assert (ddp.trainer.strategy, ddp.trainer.devices, ddp.trainer.accumulate_grad_batches) == ("ddp", 8, 1)


def test_wf42m_vit_t_recipe_builds_insightfaces_vit_t(tmp_path):
    """The one full-size ViT-T: the recipe's module (a small class count instead of 2 M), insightface-layout
    weights loaded strictly, and a batch of 1 against insightface's forward."""
    cfg = compose_config(["experiment=wf42m_vit_t", "dataset.num_classes=100"], tmp_path)
    backbone = build_module(cfg).backbone
    assert isinstance(backbone, VisionTransformer) and backbone.kept_tokens == 144
    state = insightface_state_dict(insightface_vit_keys(256, 12), dtype=torch.float32)
    backbone.load_state_dict(state, strict=True)
    backbone.eval().autocast = None  # float32 throughout, for a tight comparison
    images = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        ours = backbone(images)
        reference = insightface_forward(state, images, num_heads=8, depth=12)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
