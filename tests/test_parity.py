"""Released-code parity switches (docs/METHOD.md section 7): what each one changes, pinned, and the
latent-space default that replaced a released clamp."""
import numpy as np
import pytest
import torch

from cnd_ray import config as C
from cnd_ray.diffusion import guided
from cnd_ray.models import build_dit
from cnd_ray.models.classifier import Classifier
from cnd_ray.objective import DENOISED, ClassNDiff, frozen
from tests.helpers import fixed_batch, tiny_vae


def _bn_means(module):
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_critic_mode_decides_batch_statistics_and_dropout(mode):
    torch.manual_seed(0)
    critic = Classifier("test_resnet", 3, 16, 0.5).train()
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    before = _bn_means(critic)
    with frozen(critic, mode):
        a, b = critic(x), critic(x)
        assert not any(p.requires_grad for p in critic.parameters())
    a.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in critic.parameters())
    moved = any(not torch.equal(u, v) for u, v in zip(before, _bn_means(critic)))
    assert moved == (mode == "train")  # running statistics follow the denoised batch
    assert torch.equal(a, b) == (mode == "eval")  # dropout on in train mode
    assert critic.training and all(p.requires_grad for p in critic.parameters())  # restored


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_denoised_step_moves_the_critic_statistics_only_in_train_mode(mode):
    cfg = C.load("debug", ["method.gamma_schedule=constant", "method.gamma=1.0",
                           f"method.critic_mode={mode}", "classifier.backbone=test_resnet"])
    objective = ClassNDiff(cfg).train()
    before = _bn_means(objective.classifier)
    b = fixed_batch(cfg)
    out = objective(b["x"], b["y"], step=0)
    assert out.branch == DENOISED
    moved = any(not torch.equal(u, v) for u, v in zip(before, _bn_means(objective.classifier)))
    assert moved == (mode == "train")


def test_the_released_block_has_plain_norms_and_one_qkv():
    def dit(variant):
        cfg = C.load("paper", ["model.block=xattn_pool", f"model.xattn_variant={variant}"])
        with torch.device("meta"):
            return build_dit(cfg)

    ours, released = dit("ours"), dit("released")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) - count(released) == 147_456  # 3 LayerNorms x (weight + bias) x 1024 x 24 blocks
    cross = released.blocks[0].cross
    assert tuple(cross.qkv.weight.shape) == (3 * 1024, 1024) and not hasattr(cross, "q")
    assert not released.blocks[0].norm1.elementwise_affine and ours.blocks[0].norm1.elementwise_affine


def test_the_released_cross_attention_is_one_matrix_sliced():
    """The same maths as separate q and kv layers holding the matrix's rows."""
    from cnd_ray.models.dit import PoolCrossAttention

    torch.manual_seed(0)
    one, two = PoolCrossAttention(8, 2, one_qkv=True), PoolCrossAttention(8, 2)
    with torch.no_grad():
        two.q.weight.copy_(one.qkv.weight[:8]), two.q.bias.copy_(one.qkv.bias[:8])
        two.kv.weight.copy_(one.qkv.weight[8:]), two.kv.bias.copy_(one.qkv.bias[8:])
        two.proj.load_state_dict(one.proj.state_dict())
    c, x = torch.randn(3, 1, 8), torch.randn(3, 5, 8)
    assert torch.allclose(one(c, x), two(c, x), atol=1e-6)


@pytest.mark.parametrize("channels", ["all", "three"])
def test_guidance_on_three_channels_leaves_the_fourth_conditional(channels):
    def model(x, t, y, tone=None):  # eps depends on the label; 4 eps + 4 variance channels
        return torch.cat([x * 0 + y[:, None, None, None].float() + 1.0, x * 0], dim=1)

    x, t, y = torch.zeros(2, 4, 2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([1, 1])
    out = guided(model, y, null_label=0, scale=3.0, channels=channels)(x, t)
    cond, uncond = 2.0, 1.0
    guided_value = uncond + 3.0 * (cond - uncond)
    assert torch.all(out[:, :3] == guided_value)
    assert torch.all(out[:, 3] == (guided_value if channels == "all" else cond))
    assert torch.all(out[:, 4:] == 0)


def test_latent_critic_input_follows_the_data_space(tmp_path):
    """Latents from the real loading code (a local VAE folder, encoded, scaled to unit variance as
    the 0.18215 scale intends): a [-1, 1] clamp would cut about a third of them, and a clamped
    element passes the critic no gradient. Latent space now clamps nothing unless asked."""
    from cnd_ray import vae as vae_lib
    from cnd_ray.data import synth

    tiny_vae(tmp_path / "vae")
    vae = vae_lib.load(str(tmp_path / "vae"))
    synth.run(str(tmp_path / "img"), num_images=8, image_size=64, test_per_tone=0, progress=False)
    from PIL import Image

    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB")))
                          for p in sorted((tmp_path / "img").rglob("*.jpg"))]).permute(0, 3, 1, 2)
    with torch.no_grad():
        z = vae.encode(images.float() / 127.5 - 1).latent_dist.mean  # (8, 4, 8, 8)
    z = (z - z.mean()) / z.std()
    clamped = float((z.abs() > 1).float().mean())
    assert 0.2 < clamped < 0.45, clamped  # a unit Gaussian: 0.317

    paper = C.load("paper")
    assert paper.data.space == "latent" and paper.critic_clip == 0.0
    assert C.load("paper", ["data.space=pixel"]).critic_clip == 1.0
    assert C.load("reference").critic_clip == 1.0  # the released code's clamp, kept by its config
    latent = C.load("debug", ["data.space=latent", "data.image_size=64", "method.gamma_schedule=constant",
                              "method.gamma=1.0", "classifier.backbone=test_resnet"])
    obj = ClassNDiff(latent)
    d = obj.diffusion
    t = torch.full((8,), d.num_timesteps - 1)
    xt = d.q_sample(z, t, torch.randn_like(z))
    out = obj.dit(xt, t, torch.zeros(8, dtype=torch.long))
    zd = obj.denoised(out, z, xt, t)
    assert float((zd.abs() > 1).float().mean()) > 0.2  # not clamped: the critic sees every value
