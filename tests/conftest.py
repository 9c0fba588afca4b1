import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    # Determinism and speed on the 2-core CI machine.
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, with more logical CPUs than the 2 cores (DESIGN.md:
    whole-CPU workers plus Ray Data's file-listing task hang on num_cpus=2)."""
    import ray

    # address="local": a fresh Ray even when another one runs on this machine (Ray would join it).
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def isic_tree(tmp_path_factory):
    """Every ISIC layout of DATA.md in miniature, with its quirks and bad files."""
    from tests import isic_fixtures

    root = tmp_path_factory.mktemp("isic")
    return root, isic_fixtures.build(root)


@pytest.fixture(scope="session")
def ingested(ray_local, isic_tree, tmp_path_factory):
    """The fixture tree ingested once per label mode at 32 px: mode -> (out folder, manifest)."""
    from cnd_ray.launch import ingest
    from tests import isic_fixtures

    root, _ = isic_tree
    out = {}
    for mode in isic_fixtures.MODES:
        labels, ak = ("malignant", True) if mode == "malignant_ak" else (mode, False)
        folder = tmp_path_factory.mktemp(f"shards_{mode}")
        out[mode] = (folder, ingest.run([str(root)], str(folder), labels=labels, ak_malignant=ak,
                                        image_size=32, progress=False, shard_mb=0.02))
    return out


@pytest.fixture(scope="session")
def latent_shards(ray_local, tmp_path_factory):
    """Synthetic images ingested at 64 px with a tiny random VAE: (folder, manifest, vae)."""
    from cnd_ray.data import synth
    from cnd_ray.launch import ingest
    from tests.helpers import tiny_vae

    tmp = tmp_path_factory.mktemp("latent")
    vae = tiny_vae(tmp / "vae")
    # Enough of each class in both splits for the judge (sample metrics are on by default).
    synth.run(str(tmp / "synth"), num_images=48, image_size=96, malignant_fraction=0.35, difficulty="easy",
              test_per_tone=0, progress=False)
    manifest = ingest.run([str(tmp / "synth")], str(tmp / "shards"), image_size=64,
                          latent=str(tmp / "vae"), val_fraction=0.25, progress=False)
    return tmp / "shards", manifest, vae


@pytest.fixture(scope="session")
def small_shards(ray_local, tmp_path_factory):
    """120 synthetic images of the easy set (classes a tiny judge learns in seconds) ingested at 16 px (the
    debug config's size), 30% held out, and its test set of 4 per skin-tone group: str folder."""
    from cnd_ray.data import synth
    from cnd_ray.launch import ingest

    tmp = tmp_path_factory.mktemp("small")
    synth.run(str(tmp / "synth"), num_images=120, image_size=32, malignant_fraction=0.3, difficulty="easy",
              test_per_tone=4, progress=False)
    ingest.run([str(tmp / "synth")], str(tmp / "shards"), image_size=16, val_fraction=0.3, progress=False,
               test=[str(synth.test_folder(tmp / "synth"))])
    return str(tmp / "shards")
