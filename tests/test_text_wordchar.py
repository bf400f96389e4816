"""`ngram-wordchar`: fixed hashed word 1-2-grams + char 3-5-grams and a linear head (issue 14).

Each test fails if the feature it checks is broken: the reference below recomputes the features
in plain Python (its own word splitter, n-gram enumeration and hash arithmetic), so a change of
the hash, the lower-casing, the separators or the n-gram sets shows up as a mismatch.
"""

import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from privacy.dp_sgd import LocalTrainingSession
from shared_models import build_model, default_lr, model_names
from shared_models.datasets.text import encode_bytes
from shared_models.records import LabeledArrays, content_record_ids
from shared_models.text import TextHashedWordChar

M = TextHashedWordChar
SEPARATORS = re.compile(rb"[\s!-/:-@\[-`{-~]+")  # ASCII white space and ASCII punctuation


def _tokens(*texts, length=None):
    length = length or max(len(t.encode("utf-8")) for t in texts)
    return torch.from_numpy(encode_bytes(list(texts), length))


def _reference_counts(text: str, buckets: int, chars=(3, 4, 5)) -> Counter:
    """Bucket -> count, computed per n-gram in plain Python ints."""
    raw = bytes(c + 32 if 65 <= c <= 90 else c for c in text.encode("utf-8"))

    def poly(seq: bytes) -> int:  # ids are byte + 1
        return sum((b + 1) * M.BASE ** j for j, b in enumerate(seq)) % M.PRIME

    def bucket(code: int, salt) -> int:
        s = M.SALTS[salt]
        return (((code + s * 7_919) % M.PRIME) * M.MIX % M.PRIME + s) % buckets

    counts = Counter()
    for n in chars:
        for i in range(len(raw) - n + 1):
            counts[bucket(poly(raw[i:i + n]), n)] += 1
    words = [poly(w) for w in SEPARATORS.split(raw) if w]
    counts.update(bucket(w, "word1") for w in words)
    counts.update(bucket((a * M.PAIR + b) % M.PRIME, "word2") for a, b in zip(words, words[1:]))
    return counts


def _dense(counts: Counter, buckets: int) -> torch.Tensor:
    out = torch.zeros(buckets)
    for k, v in counts.items():
        out[k] = v
    return out / out.norm()


def test_features_of_a_record_do_not_depend_on_the_other_records_or_padding():
    model = build_model("text", "ngram-wordchar", (64,), 2)
    text = "Free entry in 2 a wkly comp to win FA Cup final tkts!"
    alone = model.features(_tokens(text))
    others = ["ok lar...", "U dun say so early hor... U c already then say...", "", "WINNER!! As a valued network customer"]
    batch = model.features(_tokens(others[0], text, *others[1:], length=120))
    buckets = model.buckets
    assert alone.shape == (1, buckets) and batch.shape == (5, buckets)
    assert torch.equal(alone[0] > 0, batch[1] > 0)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-7)
    assert torch.equal(batch[3], torch.zeros(buckets))  # an empty record has no n-gram
    # Padding inside a record (as after a cut) ends words and n-grams; never hashed as bytes.
    padded = _tokens(text, length=80)
    assert torch.equal(model.features(padded) > 0, alone > 0)


@pytest.mark.parametrize("text", ["Free cash!! Call 08001234 NOW", "ok, lar... joking wif u oni", "héllo Wörld: ünï",
                                  "a", "ab", "x  y\tz\nw"])
def test_features_match_an_independent_python_computation(text):
    model = TextHashedWordChar(num_classes=2)
    expected = _dense(_reference_counts(text, model.buckets), model.buckets)
    torch.testing.assert_close(model.features(_tokens(text))[0], expected, rtol=1e-6, atol=1e-7)
    # The same with the 2**16 buckets.
    wide = TextHashedWordChar(num_classes=2, buckets=2**16)
    torch.testing.assert_close(wide.features(_tokens(text))[0], _dense(_reference_counts(text, 2**16), 2**16),
                               rtol=1e-6, atol=1e-7)


def test_hand_enumerated_buckets_and_counts():
    model = TextHashedWordChar(num_classes=2)
    # "ab": one word, no char n-gram of 3+ bytes.
    f = model.features(_tokens("ab"))[0]
    assert (f > 0).sum() == 1 and torch.isclose(f.max(), torch.tensor(1.0))
    # "ab ab": chars "ab ", "b a", " ab" | "ab a", "b ab" | "ab ab"; word ab x2; bigram (ab, ab):
    # counts 1 x 7 and 2 x 1, norm sqrt(7 + 4).
    f = model.features(_tokens("ab ab"))[0]
    nonzero = torch.sort(f[f > 0] * math.sqrt(7 + 4)).values
    torch.testing.assert_close(nonzero, torch.tensor([1.0] * 7 + [2.0]))
    # Lower-cased ASCII: upper case gives the same features.
    assert torch.equal(model.features(_tokens("FREE Cash")), model.features(_tokens("free cash")))
    assert torch.allclose(f.norm(), torch.tensor(1.0))


def test_word_bigrams_span_separators_and_only_consecutive_words():
    words_only = TextHashedWordChar(num_classes=2, char_ngrams=())
    feats = words_only.features(_tokens("free", "cash", "free cash", "free, cash!", "freecash", "cash free",
                                        "free  \t cash"))
    present = [set(torch.nonzero(row).flatten().tolist()) for row in feats]
    free, cash, free_cash, punct, glued, cash_free, spaced = present
    assert len(free) == len(cash) == len(glued) == 1  # a unigram only, no bigram
    assert len(free_cash) == 3 and free | cash < free_cash  # free, cash and the bigram (free, cash)
    assert punct == free_cash == spaced  # punctuation and runs of white space separate the same words
    assert glued.isdisjoint(free_cash)
    assert cash_free - (free | cash) != free_cash - (free | cash)  # the bigram is ordered
    three = set(torch.nonzero(words_only.features(_tokens("free cash now"))[0]).flatten().tolist())
    assert len(three) == 5  # 3 unigrams + (free, cash) + (cash, now); no (free, now)


def test_opacus_valid_and_one_dp_sgd_step_with_bounded_per_sample_gradients():
    model = build_model("text", "ngram-wordchar", (40,), 2)
    assert ModuleValidator.validate(model, strict=False) == []
    assert [b for b in model.buffers()] == []
    texts = [f"WIN a prize {i}! call now" if i % 2 else f"see you at {i} ok" for i in range(32)]
    train = LabeledArrays(task="text", x=encode_bytes(texts, 40), y=np.array([i % 2 for i in range(32)]),
                          classes=["ham", "spam"],
                          record_ids=content_record_ids((t.encode() for t in texts), "text"))
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session = LocalTrainingSession(model, train, batch_size=16, lr=0.5, optimizer="sgd", noise_multiplier=1.0,
                                   max_grad_norm=1.0, device=torch.device("cpu"), per_sample_gradients="hooks")
    # Opacus's per-sample gradients (before clipping) of weight and bias are (p - onehot) f^T and
    # p - onehot: with unit-norm features both have the same norm, at most sqrt(2).
    x, y = torch.from_numpy(train.x[:16]), torch.from_numpy(train.y[:16])
    torch.nn.functional.cross_entropy(session.model(x), y).backward()
    linear = session.module.linear
    weight, bias = (p.grad_sample.flatten(1).norm(dim=1) for p in (linear.weight, linear.bias))
    torch.testing.assert_close(weight, bias)
    assert weight.max() <= math.sqrt(2) + 1e-5 and weight.min() > 0
    session.optimizer.zero_grad(set_to_none=True)
    # One round of DP-SGD (privacy.dp_sgd: Poisson sampling, clipping, secret noise).
    result = session.train_epochs(1)
    assert result.steps == 2 and math.isfinite(result.train_loss)
    assert all(not torch.equal(before[k], result.state[k]) for k in before)


def test_registered_for_text_with_its_learning_rates():
    assert "ngram-wordchar" in model_names("text") and "ngram-linear" in model_names("text")
    model = build_model("text", "ngram-wordchar", (200,), 2)
    out = model(torch.randint(0, 257, (3, 200)))
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    assert [n for n, _ in model.named_parameters()] == ["linear.weight", "linear.bias"]
    assert model.linear.in_features == model.buckets == 2**14
    assert build_model("text", "ngram-wordchar", (5,), 4)(torch.randint(0, 257, (2, 5))).shape == (2, 4)
    assert default_lr("text", "ngram-wordchar", "sgd") > 0 and default_lr("text", "ngram-wordchar", "sgd", dp=False) > 0
