import pytest
import timm
import torch

from cnd_ray import config as C
from cnd_ray.models.classifier import Classifier, build_classifier


def test_latent_adapter_and_head_shapes():
    m = Classifier("test_resnet", 4, 64, 0.5)
    assert isinstance(m.adapter, torch.nn.Conv2d)
    assert (m.adapter.in_channels, m.adapter.out_channels, m.adapter.kernel_size,
            m.adapter.padding) == (4, 3, (2, 2), (1, 1))
    drop1, lin1, drop2, lin2 = m.head
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (m.backbone.num_features, 64, 1)
    assert drop1.p == drop2.p == 0.5
    assert m(torch.randn(3, 4, 32, 32)).shape == (3,)


def test_rgb_input_has_no_adapter():
    m = Classifier("test_resnet", 3, 64, 0.5)
    assert isinstance(m.adapter, torch.nn.Identity)


def test_resnet101_head_is_2048_to_64_to_1():
    with torch.device("meta"):
        m = Classifier("resnet101", 4, 64, 0.5)
    assert m.head[1].in_features == 2048


def test_weights_load_from_local_file(tmp_path):
    src = timm.create_model("test_resnet", num_classes=1000)  # a "pretrained" net with its fc
    for p in src.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    cfg = C.load("debug", [f"classifier.weights={path}"])
    m = build_classifier(cfg)
    sd = m.backbone.state_dict()
    assert torch.equal(sd["conv1.0.weight"], src.state_dict()["conv1.0.weight"])


def test_weights_errors_name_the_key(tmp_path):
    with pytest.raises(C.ConfigError, match="classifier.weights: .* does not exist"):
        build_classifier(C.load("debug", [f"classifier.weights={tmp_path / 'missing.pth'}"]))
    other = tmp_path / "other.pth"
    torch.save({"foo": torch.zeros(3)}, other)
    with pytest.raises(C.ConfigError, match="no tensor .* fits the backbone"):
        build_classifier(C.load("debug", [f"classifier.weights={other}"]))


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(C.ConfigError, match="classifier.backbone"):
        build_classifier(C.load("debug", ["classifier.backbone=no_such_net"]))
