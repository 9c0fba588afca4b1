import pytest
import torch

from cnd_ray import config as C
from cnd_ray.models.dit import SIZES, AdaLNZeroBlock, DiT, build_dit


def _dit(size, patch, **kw):
    depth, hidden, heads = SIZES[size]
    args = dict(num_classes=2, class_dropout=0.1, learn_sigma=True, block="adaln_zero", tone_groups=0,
                tone_dropout=0.1)
    return DiT(input_size=32, patch_size=patch, in_channels=4, depth=depth, hidden=hidden,
               heads=heads, **{**args, **kw})


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_shapes_every_size(size, patch):
    big = size in ("S", "B", "L", "XL")
    with torch.device("meta" if big else "cpu"):  # meta: shapes without the compute
        m = _dit(size, patch, num_classes=1000)
        x = torch.randn(2, 4, 32, 32)
        out = m(x, torch.tensor([0, 999]), torch.tensor([3, 1000]))
    assert out.shape == (2, 8, 32, 32)


@pytest.mark.parametrize("name, expected", [
    ("S/2", 32_963_360), ("B/4", 130_475_648), ("L/4", 458_053_760), ("XL/2", 675_129_632)])
def test_parameter_counts_match_dit_paper(name, expected):
    size, patch = name.split("/")
    with torch.device("meta"):
        m = _dit(size, int(patch), num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == expected
    assert not m.pos_embed.requires_grad


def test_adaln_zero_blocks_are_identity_at_init():
    torch.manual_seed(0)
    m = _dit("XS", 4)
    x, c = torch.randn(3, 64, 128), torch.randn(3, 128)
    for blk in m.blocks:
        assert isinstance(blk, AdaLNZeroBlock)
        assert torch.equal(blk(x, c), x)
    # and the final layer is zero: the initial prediction is exactly 0
    out = m(torch.randn(3, 4, 32, 32), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    assert torch.count_nonzero(out) == 0


def test_xattn_pool_block_is_not_identity_and_costs_more():
    torch.manual_seed(0)
    a, b = _dit("XS", 4, block="adaln_zero"), _dit("XS", 4, block="xattn_pool")
    x, c = torch.randn(2, 64, 128), torch.randn(2, 128)
    assert not torch.allclose(b.blocks[0](x, c), x)
    # per-token matmul weights: 12 D^2 for adaLN-Zero vs 14 D^2 (+16.7%) for xattn_pool (the
    # modulation and the pooled query/output projections run once per image, not per token)
    per_image = ("adaLN", "cross.q", "cross.proj")
    per_token = lambda blk: sum(p.numel() for n, p in blk.named_parameters()  # noqa: E731
                                if p.ndim == 2 and not n.startswith(per_image))
    assert per_token(b.blocks[0]) / per_token(a.blocks[0]) == pytest.approx(14 / 12, rel=1e-3)


def test_label_dropout_uses_null_class_in_training_only():
    torch.manual_seed(0)
    m = _dit("T", 4, num_classes=5, class_dropout=1.0)
    y = torch.tensor([0, 1, 2])
    m.train()
    assert torch.equal(m.y_embedder(y), m.y_embedder.table(torch.full_like(y, 5)))
    m.eval()
    assert torch.equal(m.y_embedder(y), m.y_embedder.table(y))


def test_null_label_is_num_classes_for_any_class_count():
    for k in (1, 2, 7):
        m = _dit("T", 4, num_classes=k)
        assert m.y_embedder.table.num_embeddings == k + 1


def test_tone_condition_changes_output():
    torch.manual_seed(0)
    m = _dit("T", 4, tone_groups=3, tone_dropout=0.0).eval()
    for p in m.parameters():  # leave the zero-init so the condition can show
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([5, 5]), torch.tensor([0, 0])
    a = m(x, t, y, torch.tensor([0, 0]))
    b = m(x, t, y, torch.tensor([2, 2]))
    null = m(x, t, y)
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    assert m.tone_embedder.table.num_embeddings == 4


def test_build_dit_from_config():
    cfg = C.load("quickstart")
    m = build_dit(cfg)
    assert 1.2e6 < sum(p.numel() for p in m.parameters()) < 1.4e6  # the brief's 1.3M DiT
    assert m.in_channels == 3 and m.input_size == 32


def test_activation_checkpointing_gives_the_same_gradients():
    """model.grad_checkpoint trades compute for memory, nothing else: the same loss and gradients."""
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        m = _dit("T", 4, grad_checkpoint=on).train()
        x, t, y = torch.randn(3, 4, 32, 32), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2])
        m(x, t, y).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
