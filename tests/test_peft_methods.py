import pytest
import torch

from memrl.peft_methods import METHODS, apply_method

MASK = [1, 0, 1, 0]


@pytest.mark.parametrize("method", METHODS)
def test_only_the_intended_parameters_change(method, tiny_model):
    from memrl.search_space import SearchSpace

    model = tiny_model.copy()
    model.label_embedding.requires_grad_(False)
    prefixes = SearchSpace(model.unet).prefixes(MASK)
    trainable = apply_method(model.unet, prefixes, method, lora_rank=2)
    assert trainable, method
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in names:
        inside = any(f"unet.{p}." in name for p in prefixes)
        assert inside, f"{method}: {name} is trainable but outside the mask"
    if method == "attention":
        assert all(".attn1." in n or ".attn2." in n for n in names)
    if method == "bias_norm":
        assert all(n.endswith("bias") or "norm" in n for n in names)
    if method == "lora":
        assert all("lora_" in n for n in names)
    if method == "svdiff":
        assert all(n.endswith("delta") for n in names)
    if method == "difffit":
        assert any(n.endswith("difffit_scale") for n in names)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in trainable]
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    t = torch.full((8,), 500)
    labels = torch.arange(8)
    loss = (model(x + 0.5 * torch.randn_like(x), t, labels) - x).square().mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{method}: {n} got no gradient"
        else:
            assert p.grad is None
    opt = torch.optim.SGD(trainable, lr=1.0)
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{method}: frozen {n} changed"
    assert any(not torch.equal(p, q) for p, q in zip(trainable, before)), f"{method}: nothing trained"


def test_unknown_method_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="method='magic' is not one of"):
        apply_method(tiny_model.unet, [], "magic")


@pytest.mark.parametrize("method", METHODS)
def test_merged_adapters_give_the_same_outputs_as_a_plain_unet(method, tiny_model):
    from memrl.peft_methods import merge_adapters
    from memrl.search_space import SearchSpace

    model = tiny_model.copy()
    trainable = apply_method(model.unet, SearchSpace(model.unet).prefixes(MASK), method, lora_rank=2)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    x, t, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.full((4,), 300), torch.arange(4)
    with torch.no_grad():
        before = model(x, t, labels)
    merge_adapters(model.unet)
    names = [n for n, _ in model.unet.named_parameters()]
    assert not any("lora_" in n or "difffit" in n or "parametrizations" in n for n in names)
    assert sorted(names) == sorted(n for n, _ in tiny_model.unet.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model(x, t, labels), before, atol=1e-4)
