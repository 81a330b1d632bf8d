import numpy as np
import pytest
import torch

from dermcir.config import ModelConfig, TrainConfig
from dermcir.losses import CategoryContrastiveLoss
from dermcir.models import ComposedRetrievalModel, create_backbone, list_backbones, list_text_encoders
from dermcir.similarity import fused_similarity


def tiny(backbone="lite0", text="bert", pretrained=False, **kw):
    settings = {"image_size": 64, "grid": 4, "dim": 32, "heads": 2, "n_masks": 3, **kw}
    return ComposedRetrievalModel(ModelConfig(backbone=backbone, text_encoder=text, **settings), pretrained=pretrained)


IMAGES = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
TEXTS = ["pigment network atypical", "streaks irregular; blue-whitish veil present", "sex male", "elevation flat"]


@pytest.mark.parametrize("backbone", list_backbones())
def test_backbones_give_three_levels_at_strides_8_16_32(backbone):
    net = create_backbone(backbone, pretrained=False, img_size=64)
    maps = net(torch.randn(2, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [8, 4, 2]
    assert [m.shape[1] for m in maps] == net.channels
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("backbone", list_backbones())
@pytest.mark.parametrize("text", list_text_encoders())
def test_one_training_step_per_registered_encoder(backbone, text):
    torch.manual_seed(0)
    model = tiny(backbone, text)
    model.train()
    loss_fn = CategoryContrastiveLoss(2, 6, 32, 0.6)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad] + list(loss_fn.parameters()), lr=1e-3)
    q = model.encode_query(IMAGES, TEXTS)
    t = model.encode_target(IMAGES)
    assert q.shape == t.shape == (4, model.embedding_dim)
    loss = loss_fn(q, t, torch.tensor([0, 0, 1, 1]))["total"]
    assert torch.isfinite(loss)
    before = model.heads[0].levels[0].fusion[0].attn.in_proj_weight.detach().clone()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.heads[0].levels[0].fusion[0].attn.in_proj_weight)


def test_encoder_inner_product_is_eq9_on_real_model():
    model = tiny().eval()
    with torch.no_grad():
        maps = model.image_features(IMAGES)
        tok, pad = model.text_features(TEXTS)
        dq = model.describe_query(maps, tok, pad)
        dt = model.describe_target(model.image_features(IMAGES[::-1].copy()))
        direct = fused_similarity(dq.locals, dt.locals, dq.globals, dt.globals, 0.6)
        via = model.encode_query(IMAGES, TEXTS) @ model.encode_target(IMAGES[::-1].copy()).T
    torch.testing.assert_close(via, direct, rtol=1e-5, atol=1e-5)


def test_ensemble_members_average_unit_descriptors_and_keep_eq9():
    torch.manual_seed(0)
    model = tiny(members=2).eval()
    assert len(model.heads) == 2
    with torch.no_grad():
        maps = model.image_features(IMAGES)
        tok, pad = model.text_features(TEXTS)
        members = [h.describe(maps, h.text_states(tok, pad), pad) for h in model.heads]
        both = model.describe_query(maps, tok, pad)
        # independently initialised: the members disagree, and the model's descriptor is their unit-vector mean
        assert not torch.allclose(members[0].locals[0], members[1].locals[0])
        for i in range(3):
            expected = (torch.nn.functional.normalize(members[0].locals[i], dim=-1)
                        + torch.nn.functional.normalize(members[1].locals[i], dim=-1)) / 2
            torch.testing.assert_close(both.locals[i], expected)
            assert both.masks[i].shape == (4, 6, 4, 4)  # k masks of each member
        dt = model.describe_target(model.image_features(IMAGES[::-1].copy()))
        direct = fused_similarity(both.locals, dt.locals, both.globals, dt.globals, 0.6)
        via = model.encode_query(IMAGES, TEXTS) @ model.encode_target(IMAGES[::-1].copy()).T
    torch.testing.assert_close(via, direct, rtol=1e-5, atol=1e-5)
    assert model.encode_target(IMAGES).shape == (4, model.embedding_dim) == (4, 6 * 32)
    with pytest.raises(ValueError, match="setting members=0: expected an integer >= 1"):
        tiny(members=0)


def test_companion_adds_its_weighted_score_and_keeps_one_inner_product():
    torch.manual_seed(0)
    model = tiny(companion={"dim": 16, "heads": 2, "members": 2}, companion_weight=0.3).eval()
    c = model.companion
    assert c.text_encoder is model.text_encoder  # shared, not a second copy
    assert c.backbone is not model.backbone and not any(p.requires_grad for p in c.backbone.parameters())
    assert (c.config.dim, c.config.grid, len(c.heads), c.config.image_size) == (16, 4, 2, 64)
    other = IMAGES[::-1].copy()
    with torch.no_grad():
        tok, pad = model.text_features(TEXTS)
        scores = []
        for m in (model, c):  # each model's own Eq. 9, computed from its descriptors
            dq = m.describe_query(m.image_features(IMAGES), tok, pad)
            dt = m.describe_target(m.image_features(other))
            scores.append(fused_similarity(dq.locals, dt.locals, dq.globals, dt.globals, 0.6))
        q, t = model.encode_query(IMAGES, TEXTS), model.encode_target(other)
        assert q.shape == t.shape == (4, model.embedding_dim) == (4, 6 * 32 + 6 * 16)
        torch.testing.assert_close(q @ t.T, 0.7 * scores[0] + 0.3 * scores[1], rtol=1e-5, atol=1e-5)
        # the parts tile the vector, so per-part scores add up to the score
        parts = model.part_slices()
        assert len(parts) == 12 and "companion_global_3" in parts
        total = sum(q[:, s] @ t[:, s].T for s in parts.values())
        torch.testing.assert_close(total, q @ t.T, rtol=1e-5, atol=1e-5)
        # every query mode reaches the companion too
        for kwargs in ({"images": IMAGES}, {"texts": TEXTS}):
            vec, masks = model.encode_query_with_masks(**kwargs)
            assert vec.shape == q.shape and vec[:, 6 * 32 :].abs().sum() > 0
            assert len(masks) == (3 if "images" in kwargs else 0)


@pytest.mark.parametrize(("settings", "message"), [
    ({"companion": {"beta": 1.0}}, r"setting\(s\) \['beta'\] cannot differ"),
    ({"companion": {"dim": 8}, "companion_weight": 1.0}, "companion_weight must lie strictly between 0 and 1"),
    ({"companion": ["dim"]}, r"setting companion=\['dim'\]: expected a dict or null"),
    ({"companion": {"dim": 30, "heads": 4}}, "companion: setting dim=30: expected an integer >= 1 divisible by heads=4"),
])
def test_bad_companion_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny(**settings)


def test_one_pass_training_modes_equal_separate_descriptions():
    torch.manual_seed(0)
    model = tiny(fusion_layers=2).eval()
    head = model.heads[0]
    with torch.no_grad():
        maps = model.image_features(IMAGES)
        tok, pad = model.text_features(TEXTS)
        text = head.text_states(tok, pad)
        joint = head.describe_training_modes(maps, text, pad)
        separate = (head.describe(maps, None, None), head.describe(maps, text, pad), head.describe(None, text, pad))
    for mode, (a, b) in enumerate(zip(joint, separate, strict=True)):
        for x, y in zip(a.locals + a.globals, b.locals + b.globals, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"mode {mode}")


@pytest.mark.parametrize("variant", [{}, {"members": 2}, {"companion": {"dim": 16, "heads": 2}, "companion_weight": 0.3}])
@pytest.mark.parametrize("mode", ["composed", "image-only", "text-only"])
@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
def test_every_query_mode_and_beta_is_eq9_as_one_inner_product(variant, mode, beta):
    torch.manual_seed(0)
    model = tiny(**variant).eval()
    other = IMAGES[::-1].copy()
    images, texts = {"composed": (IMAGES, TEXTS), "image-only": (IMAGES, None), "text-only": (None, TEXTS)}[mode]
    with torch.no_grad():
        tok, pad = model.text_features(TEXTS) if texts is not None else (None, None)
        direct = []
        for m in [model] + ([model.companion] if model.companion is not None else []):
            dq = m.describe_query(m.image_features(images) if images is not None else None, tok, pad)
            dt = m.describe_target(m.image_features(other))
            direct.append(fused_similarity(dq.locals, dt.locals, dq.globals, dt.globals, beta))
        w = model.config.companion_weight
        expected = direct[0] if len(direct) == 1 else (1 - w) * direct[0] + w * direct[1]
        via = model.encode_query(images, texts, beta=beta) @ model.encode_target(other).T
    torch.testing.assert_close(via, expected, rtol=1e-5, atol=1e-5)


def test_query_modes_differ_and_image_only_is_the_weighted_target():
    model = tiny().eval()
    with torch.no_grad():
        composed = model.encode_query(IMAGES, TEXTS)
        image_only = model.encode_query(IMAGES)
        text_only = model.encode_query(texts=TEXTS)
        target = model.encode_target(IMAGES)
    assert composed.shape == image_only.shape == text_only.shape
    assert not torch.allclose(composed, image_only)
    # image-only query parts are the target's own unit descriptors, weighted by β and 1 − β
    d = model.config.dim
    torch.testing.assert_close(image_only[:, : 3 * d], 0.6 * target[:, : 3 * d])
    torch.testing.assert_close(image_only[:, 3 * d :], 0.4 * target[:, 3 * d :])
    with pytest.raises(ValueError, match="image, a text, or both"):
        model.describe_query(None, None, None)
    with pytest.raises(ValueError, match="text 1 is empty"):
        model.encode_query(IMAGES[:2], ["fine", "  "])
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        model.encode_query(IMAGES[:2], ["one"])


def test_masks_are_spatial_distributions():
    model = tiny().eval()
    with torch.no_grad():
        d = model.describe_target(model.image_features(IMAGES))
    for level, m in enumerate(d.masks):
        assert m.shape == (4, 3, 4, 4), level
        torch.testing.assert_close(m.sum(dim=(2, 3)), torch.ones(4, 3))


def test_loss_parts_lonely_rows_and_shape_errors():
    # (the own image and the positives are checked against a naive loop in the next test)
    loss_fn = CategoryContrastiveLoss(2, 2, 4, 0.5, temperature=1.0, proxy_weight=0.0)
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    out = loss_fn(v, v, torch.tensor([0, 1, 0, 1]))
    assert set(out) == {"contrastive", "proxy", "total"}
    lonely = CategoryContrastiveLoss(4, 2, 4, 0.5, proxy_weight=0.0)(v, v, torch.tensor([0, 1, 2, 3]))
    assert lonely["contrastive"] == 0  # no query has a positive: nothing to pull together, and no NaN
    with pytest.raises(ValueError, match="labels"):
        loss_fn(v, v[:3], torch.tensor([0, 1, 0]))


def test_loss_averages_only_rows_with_a_positive_and_keeps_gradients_finite():
    """A batch holding a single case of a category (a rare one, often) must not bias or break the loss."""
    torch.manual_seed(0)
    loss_fn = CategoryContrastiveLoss(3, 2, 4, 0.5, temperature=0.5, proxy_weight=0.0)
    q = torch.randn(5, 8, requires_grad=True)
    t = torch.randn(5, 8, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2])  # row 4 is alone in its category
    out = loss_fn(q, t, y)
    logits = (q @ t.T / 0.5).detach()
    naive = []
    for i in range(4):  # rows with a positive: -log(sum over positives / sum over all, own image left out)
        others = [j for j in range(5) if j != i]
        pos = [j for j in others if y[j] == y[i]]
        naive.append(torch.logsumexp(logits[i, others], 0) - torch.logsumexp(logits[i, pos], 0))
    torch.testing.assert_close(out["contrastive"].detach(), torch.stack(naive).mean())
    out["total"].backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(t.grad).all()


def test_swin_requires_weights_or_hub():
    with pytest.raises(ValueError, match="no offline weights"):
        create_backbone("swin_t", pretrained=True)


def test_swin_loads_a_local_checkpoint(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("swin_t", pretrained=False, img_size=64)
    save_file({k: v.contiguous() for k, v in src.body.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    net = create_backbone("swin_t", weights=str(tmp_path / "swin.safetensors"), img_size=64)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(net.eval()(x)[2], src.eval()(x)[2])


@pytest.mark.parametrize("kind", ["safetensors", "pth", "microsoft"])
def test_swin_loads_a_published_checkpoint_layout(tmp_path, kind):
    """timm's hub files (and so a downloaded Swin-T) name stage N ``layers.N``; the features_only body ``layers_N``.
    Such a file was refused ("lacks 165 backbone weights"): only dermcir's own saved bodies loaded. Microsoft's
    original .pth also downsamples at the end of a stage and calls the classifier ``head``."""
    import re

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    full = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64).eval()
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    path = tmp_path / f"swin.{kind}"
    if kind == "microsoft":
        state = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
                 .replace("head.fc.", "head."): v for k, v in state.items()}
        assert "layers.0.downsample.reduction.weight" in state
    save_file(state, str(path)) if kind == "safetensors" else torch.save({"model": state}, path)
    net = create_backbone("swin_t", weights=str(path), img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        h, stages = full.patch_embed(x), []
        for layer in full.layers:
            h = layer(h)
            stages.append(h.permute(0, 3, 1, 2))
        for got, want in zip(net(x), stages[1:], strict=True):
            torch.testing.assert_close(got, want)


# timm's table interpolation trips two torch warnings of its own (non-contiguous searchsorted, sequence indexing)
@pytest.mark.filterwarnings("ignore:torch.searchsorted:UserWarning", "ignore:Using a non-tuple sequence:UserWarning")
def test_a_swin_checkpoint_of_224_px_windows_loads_at_another_size(tmp_path):
    """At 64 px the last stages' windows shrink (2×2): the 224-px file's position-bias tables are resized."""
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "swin224.safetensors"))
    net = create_backbone("swin_t", weights=str(tmp_path / "swin224.safetensors"), img_size=64)
    table = net.body.state_dict()["layers_3.blocks.1.attn.relative_position_bias_table"]
    assert tuple(table.shape) == (9, 24) and torch.isfinite(table).all()
    torch.testing.assert_close(net.body.state_dict()["patch_embed.proj.weight"], state["patch_embed.proj.weight"])


def test_a_backbone_file_of_another_architecture_or_none_is_refused_naming_it(tmp_path):
    """Lite1 weights loaded into Lite0 without a word (its shared blocks taken, the rest ignored); Lite2 and Swin-S
    gave a RuntimeError traceback; a file that is not weights gave torch's advice to load it with weights_only=False."""
    import timm
    from safetensors.torch import save_file

    for name, says in [("tf_efficientnet_lite1", "weights that tf_efficientnet_lite0 does not have"),
                       ("tf_efficientnet_lite2", "weights of other shapes than tf_efficientnet_lite0's")]:
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}, str(path))
        with pytest.raises(ValueError, match=f"{path}: .*{says}"):
            create_backbone("lite0", weights=str(path))
    small = tmp_path / "swin_s.safetensors"
    state = timm.create_model("swin_small_patch4_window7_224", img_size=64).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(small))
    with pytest.raises(ValueError, match=f"{small}: \\d+ weights that swin_tiny_patch4_window7_224 does not have"):
        create_backbone("swin_t", weights=str(small), img_size=64)
    junk = tmp_path / "notes.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{junk}: not a readable weights file") as caught:
        create_backbone("lite0", weights=str(junk))
    assert "weights_only" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match="backbone_weights=.*gone.safetensors: no such file or folder"):
        create_backbone("lite0", weights=str(tmp_path / "gone.safetensors"))


def test_bert_folders_without_a_tokenizer_or_of_another_family_are_refused(tmp_path):
    """transformers 5 built an empty tokenizer for a folder without tokenizer files: every word read as [UNK]."""
    from dermcir.models import create_text_encoder

    enc = create_text_encoder("bert", pretrained=False)
    enc.model.save_pretrained(tmp_path / "weights_only")  # as model.save_pretrained alone writes it
    with pytest.raises(FileNotFoundError, match="weights_only: no tokenizer files"):
        create_text_encoder("bert", weights=str(tmp_path / "weights_only"))
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    enc.tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="gpt2: model_type 'gpt2' is not a BERT-family encoder"):
        create_text_encoder("bert", weights=str(tmp_path / "gpt2"), pretrained=False)
    with pytest.raises(ValueError, match="max_text_tokens=1000: the text encoder in .* reads at most 512 tokens"):
        create_text_encoder("bert", pretrained=False, max_tokens=1000)


def test_heads_zero_is_a_named_setting_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match=r"setting heads=0: expected an integer >= 1"):
        ModelConfig(heads=0)
    with pytest.raises(ValueError, match=r"companion: setting heads=0: expected an integer >= 1"):
        ModelConfig(companion={"heads": 0})


def test_bert_loads_a_local_folder(tmp_path):
    from dermcir.models import create_text_encoder

    enc = create_text_encoder("bert", pretrained=False)
    enc.model.save_pretrained(tmp_path / "bert")
    enc.tokenizer.save_pretrained(tmp_path / "bert")
    again = create_text_encoder("bert", weights=str(tmp_path / "bert"))
    a, _ = enc.eval()(["a lesion"])
    b, _ = again.eval()(["a lesion"])
    torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        create_text_encoder("bert", weights=str(tmp_path))


def test_train_config_defaults_follow_the_seed():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.patience) == (1e-4, 1e-5, 100, 30)


def test_loss_logits_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    loss_fn = CategoryContrastiveLoss(3, 2, 4, 0.5)
    q, t = torch.randn(6, 8), torch.randn(6, 8)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(q, t, y)
    outside = loss_fn(q, t, y)
    assert inside["total"].dtype == torch.float32
    torch.testing.assert_close(inside["total"], outside["total"])  # bf16 logits moved it by ~1e-2


def test_images_must_be_uint8_and_a_flipped_view_is_taken():
    # a float image was divided by 255 in place (as_tensor shares its memory) and scaled as if it held 0-255 pixels
    model = tiny().eval()
    with pytest.raises(ValueError, match="uint8 array .* got torch.float32"):
        model.normalize(IMAGES.astype(np.float32))
    # a flipped view (negative strides) is taken as it is (torch.as_tensor refused it)
    torch.testing.assert_close(model.normalize(IMAGES[:, ::-1]), model.normalize(IMAGES[:, ::-1].copy()))


def test_text_must_be_a_list_and_fusion_layers_at_least_one():
    model = tiny().eval()
    with pytest.raises(TypeError, match="list of strings"):
        model.encode_query(texts="pigment network atypical")
    with pytest.raises(ValueError, match="fusion_layers=0: expected an integer >= 1"):
        tiny(fusion_layers=0)


def test_encode_query_refuses_invisible_and_overlong_texts():
    """The search guarded both, but the model's own API took a zero-width space as a text, and cut a long text
    without a word (two texts differing past the cut gave equal vectors; a training set lost its category words)."""
    model = tiny(max_text_tokens=16).eval()
    for invisible in ("\u200b", " \t\n", "\u200b\u2060"):
        with pytest.raises(ValueError, match="text 0 is empty \\(or only invisible characters\\)"):
            model.encode_query(texts=[invisible])
    long = "pigment network atypical; streaks irregular; blue-whitish veil present; regression structures present"
    with pytest.raises(ValueError, match=r"1 of 2 text\(s\) are longer than the text encoder reads \(16 tokens, the "
                                         r"model's max_text_tokens\): the longest, text 1 .* is \d+ tokens"):
        model.encode_query(texts=["sex male", long])
    with torch.no_grad():
        assert model.encode_query(texts=["sex male"]).shape[0] == 1  # a text that fits is encoded as before


def test_a_weights_path_that_is_not_there_is_named_not_taken_for_a_hub_name():
    """A moved or mistyped path was handed to the hub library as a model name: "Repo id must be in the form ..."
    13-22 s later (or, online, a 69 s download attempt). A checkpoint records absolute paths, so a folder moved after
    training now reads the same way at search."""
    from dermcir.models.backbones import swin_t
    from dermcir.models.text_encoders import bert

    with pytest.raises(FileNotFoundError, match="text_weights=/nowhere/bert: no such file or folder on this machine"):
        bert(weights="/nowhere/bert")
    with pytest.raises(FileNotFoundError, match="backbone_weights=swin.pth: no such file or folder"):
        swin_t(weights="swin.pth", img_size=64)
    # lite0 has no hub to ask: any value is a file (a typo without a weight file's ending passed the first check);
    # "~" is not expanded by the builders, so not by the check either
    from dermcir.training import get_profile

    for value in ("gpu_payload/lite0", "~/w.safetensors"):
        with pytest.raises(FileNotFoundError, match=f"backbone_weights={value}: no such file or folder"):
            get_profile("gpu", backbone_weights=value)
