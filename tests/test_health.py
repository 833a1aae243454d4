import math

import torch

from unsupdistill.losses.health import collapse_warnings, health_signals

K, D = 512, 64


def signals(teacher_logits, features):
    return health_signals(teacher_logits, torch.zeros(1, 1, K), 0.04, features)


def test_healthy_outputs_raise_no_warning():
    torch.manual_seed(0)
    s = signals(torch.randn(256, K), torch.randn(256, D))
    assert 0 < s["teacher_entropy"] < math.log(K)
    assert math.isclose(s["teacher_kl_uniform"], math.log(K) - s["teacher_entropy"])
    assert abs(s["student_feature_std"] - 1 / math.sqrt(D)) < 0.3 / math.sqrt(D)
    assert collapse_warnings(s, K, D) == {}


def test_uniform_teacher_is_reported():
    s = signals(torch.zeros(64, K), torch.randn(64, D))
    assert s["teacher_kl_uniform"] < 1e-4
    warnings = collapse_warnings(s, K, D)
    assert list(warnings) == ["uniform"] and "nearly uniform" in warnings["uniform"]


def test_one_hot_teacher_is_reported():
    logits = torch.zeros(64, K)
    logits[:, 7] = 10.0
    warnings = collapse_warnings(signals(logits, torch.randn(64, D)), K, D)
    assert list(warnings) == ["one_hot"] and "one-hot" in warnings["one_hot"]


def test_features_collapsed_to_a_point_are_reported():
    features = torch.ones(64, D) + 1e-6 * torch.randn(64, D)
    warnings = collapse_warnings(signals(torch.randn(64, K), features), K, D)
    assert "collapsed to a point" in warnings["features"]


def test_distillation_and_dino_give_the_one_feature_collapse_diagnosis():
    """Distillation watches only its student's features; it reports them collapsed by the same rule and in the same
    words as DINO (one owner: losses.health.feature_collapse_warning)."""
    from types import SimpleNamespace

    from unsupdistill.losses.health import feature_collapse_warning
    from unsupdistill.methods.distill.method import Distillation

    collapsed = signals(torch.randn(64, K), torch.ones(64, D) + 1e-6 * torch.randn(64, D))
    method = Distillation.__new__(Distillation)
    method.spec = SimpleNamespace(feature_dim=D)
    expected = feature_collapse_warning(collapsed, D)
    assert list(expected) == ["features"]
    assert method.warnings(collapsed) == expected == {"features": collapse_warnings(collapsed, K, D)["features"]}
    healthy = {"student_feature_std": 1 / math.sqrt(D)}
    assert method.warnings(healthy) == feature_collapse_warning(healthy, D) == {}
