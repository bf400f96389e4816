import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from shared_models import DEFAULT_MODELS, build_model, model_names
from shared_models.text import TextHashedNgrams

CASES = [
    ("vision", (1, 8, 8), lambda n: torch.rand(n, 1, 8, 8)),
    ("vision", (1, 28, 28), lambda n: torch.rand(n, 1, 28, 28)),
    ("vision", (3, 37, 53), lambda n: torch.rand(n, 3, 37, 53)),
    ("speech", (64, 40), lambda n: torch.randn(n, 64, 40)),
    ("speech", (13, 40), lambda n: torch.randn(n, 13, 40)),
    ("text", (200,), lambda n: torch.randint(0, 257, (n, 200))),
    ("text", (7,), lambda n: torch.randint(0, 257, (n, 7))),
]


@pytest.mark.parametrize("task,shape,make", CASES)
def test_every_model_gives_logits_per_example_for_any_input_size(task, shape, make):
    for name in model_names(task):
        model = build_model(task, name, shape, num_classes=3)
        out = model(make(5))
        assert out.shape == (5, 3), (task, name, shape)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("task", ["vision", "speech", "text"])
def test_models_are_opacus_valid_and_hold_no_integer_buffers(task):
    shape = {"vision": (1, 28, 28), "speech": (64, 40), "text": (200,)}[task]
    for name in model_names(task):
        model = build_model(task, name, shape, num_classes=2)
        assert ModuleValidator.validate(model, strict=False) == [], (task, name)
        assert [b for b in model.buffers() if not torch.is_floating_point(b)] == []


def test_dp_defaults_have_no_recurrent_layer():
    assert DEFAULT_MODELS == {"vision": "cnn", "speech": "conv", "text": "ngram-linear"}
    for task, shape in (("speech", (64, 40)), ("text", (200,))):
        model = build_model(task, None, shape, 2)
        assert not any("rnn" in n for n, _ in model.named_modules()), task


@pytest.mark.parametrize("task,name", [("vision", "cnn"), ("speech", "conv"), ("speech", "conv-gru"), ("text", "conv"),
                                       ("text", "lstm"), ("text", "ngram-linear")])
def test_one_dp_sgd_step_changes_weights(task, name):
    shape, make = {"vision": ((1, 8, 8), lambda n: torch.rand(n, 1, 8, 8)),
                   "speech": ((16, 40), lambda n: torch.randn(n, 16, 40)),
                   "text": ((20,), lambda n: torch.randint(1, 257, (n, 20)))}[task]
    torch.manual_seed(0)
    model = build_model(task, name, shape, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(make(32), torch.randint(0, 2, (32,))), batch_size=16)
    engine = PrivacyEngine(accountant="rdp")
    gsm, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                       data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                       grad_sample_mode="hooks")
    x, y = next(iter(dl))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    opt.step()
    after = gsm._module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    assert engine.accountant.history[-1][2] == 1


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="task must be one of"):
        build_model("audio", None, (1,), 2)
    with pytest.raises(ValueError, match="must be one of"):
        build_model("text", "transformer", (10,), 2)
    with pytest.raises(ValueError, match="3 axes"):
        build_model("vision", None, (28, 28), 2)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("vision", None, (1, 8, 8), 1)


def test_hashed_ngram_features_are_fixed_normalised_and_order_sensitive():
    model = build_model("text", "ngram-linear", (8,), 2)
    a = torch.tensor([[ord(c) + 1 for c in "free win"]])
    b = torch.tensor([[ord(c) + 1 for c in "win free"]])
    padded = torch.cat([a, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    fa, fb = model.features(a), model.features(b)
    assert fa.shape == (1, 4096) and torch.allclose(fa.norm(), torch.tensor(1.0))
    assert torch.equal(fa, model.features(padded))  # padding adds nothing
    assert not torch.equal(fa, fb)  # same bytes, different bigrams and trigrams
    assert [n for n, p in model.named_parameters()] == ["linear.weight", "linear.bias"]


def test_square_rooted_ngram_features_match_counts_worked_by_hand():
    # "aaaa": byte 1-gram "a" 4 times, 2-gram "aa" 3 times, 3-gram "aaa" twice (three buckets).
    tokens = torch.tensor([[ord("a") + 1] * 4 + [0, 0]])
    counts = torch.tensor([4.0, 3.0, 2.0])
    for name, expected in (("ngram-linear", counts / counts.norm()), ("ngram-sqrt", counts.sqrt() / 3.0)):
        feats = build_model("text", name, (6,), 2).features(tokens)[0]
        values = feats[feats != 0].sort(descending=True).values
        torch.testing.assert_close(values, expected)
    assert build_model("text", "ngram-sqrt", (6,), 2).features(torch.zeros(1, 6, dtype=torch.long)).abs().sum() == 0


def test_square_rooted_ngram_features_depend_on_their_own_record_only():
    model = build_model("text", "ngram-sqrt", (12,), 2)
    batch = torch.randint(1, 257, (5, 12))
    alone = torch.cat([model.features(batch[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(model.features(batch), alone)
    torch.testing.assert_close(model.features(batch).norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="power must be in"):
        TextHashedNgrams(num_classes=2, power=0.0)


def test_default_sgd_learning_rate_depends_on_dp():
    from shared_models import default_lr

    # Clipped, noised DP-SGD steps need a larger rate than raw gradients (see NON_PRIVATE_SGD_LR).
    assert default_lr("vision", None, "sgd") == 0.5 and default_lr("vision", None, "sgd", dp=False) == 0.05
    assert default_lr("speech", "conv-gru", "sgd", dp=False) == 0.05
    assert default_lr("text", None, "sgd", dp=False) == default_lr("text", None, "sgd") == 8.0
    assert default_lr("vision", None, "adam", dp=False) == 0.002
