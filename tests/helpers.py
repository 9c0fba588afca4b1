"""Small builders shared by the tests."""
import torch


def fixed_batch(cfg, n=8, seed=0):
    """A deterministic batch in the config's input shape: {"x", "y"}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return {"x": x, "y": y}


def tiny_vae(folder):
    """A randomly initialised diffusers AutoencoderKL (downsample 8, like SD's) saved like a real one."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    vae.save_pretrained(folder)
    return vae
