"""Text models over byte-level token ids.

Token ids come from `shared_models.datasets.text.encode_bytes` (UTF-8 byte + 1, 0 = padding): a
data-independent tokenizer, because a vocabulary built from one client's text would leak
that text to everyone who receives the model.

Seed sketch: Embedding-LSTM(128)-Dense. `TextRNN` follows it (LSTM or GRU). `TextConv` is the
DP default: under DP-SGD the byte-level Conv1d reached 0.980 on SMS Spam at eps=8 where the
LSTM reached 0.887-0.923 and collapsed at eps=3, at 16-23x the cost (DESIGN 9).
"""

from __future__ import annotations

import torch
from torch import nn

from .sequence import ConvBlock1d, GlobalPoolHead, RecurrentHead

VOCAB_SIZE = 257  # 256 byte values + padding id 0


class TextHashedNgrams(nn.Module):
    """Fixed hashed byte n-gram features + a linear classifier (DP-friendly text model).

    Features are data-independent (Tramer & Boneh, ICLR 2021, "Differentially Private
    Learning Needs Better Features"): each byte n-gram (n in `ngrams`) is hashed into one of
    `buckets` counters, the counts are raised to `power`, the vector is L2-normalised, and
    only the Linear head is trained. Normalised features bound each example's gradient norm
    by ~sqrt(2), so DP-SGD's clipping discards almost nothing, and the noise is spread over
    few parameters.

    power: 1 (`ngram-linear`) keeps the counts; 0.5 (`ngram-sqrt`) is power normalisation
    (the Hellinger map, Perronnin et al., ECCV 2010; sublinear term frequency in text
    retrieval): a byte n-gram repeated in one message weighs less against the rare n-grams
    that tell spam from ham. Per record, so still data-independent. On SMS Spam under DP it
    measured better than the counts (`benchmarks/text_recipe.py`).

    Input: token ids (B, L) int64 in [0, 256], any L >= 1. Output: logits (B, num_classes).
    Raises ValueError for n-grams longer than 4 or a power outside (0, 1].
    """

    # Odd multipliers for the n-gram hash (fixed: every party computes the same features).
    _MULTIPLIERS = (1, 257, 66_049, 16_974_593)

    def __init__(self, num_classes: int, buckets: int = 4096, ngrams: tuple[int, ...] = (1, 2, 3),
                 power: float = 1.0) -> None:
        super().__init__()
        if max(ngrams) > len(self._MULTIPLIERS):
            raise ValueError(f"n-grams up to {len(self._MULTIPLIERS)} are supported, got {ngrams}")
        if not 0 < power <= 1:
            raise ValueError(f"power must be in (0, 1], got {power}")
        self.buckets, self.ngrams, self.power = buckets, ngrams, power
        self.linear = nn.Linear(buckets, num_classes)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, buckets) float32, L2-normalised hashed n-gram counts ** power (no trainable
        parameters; a record without any n-gram gives zeros)."""
        batch, length = tokens.shape
        feats = torch.zeros(batch, self.buckets, device=tokens.device)
        for n in self.ngrams:
            if length < n:
                continue
            windows = tokens.unfold(1, n, 1)  # (B, L-n+1, n)
            code = sum(windows[..., j] * self._MULTIPLIERS[j] for j in range(n)) + n * 1_000_003
            valid = (windows > 0).all(dim=-1).float()
            feats.scatter_add_(1, code % self.buckets, valid)
        if self.power != 1.0:
            feats = feats.pow(self.power)  # 0 stays 0; a nonzero count stays >= 1, so the clamp below holds
        return feats / feats.norm(dim=1, keepdim=True).clamp(min=1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(tokens))


class TextRNN(nn.Module):
    """The seed's Embedding-(LSTM|GRU)-Dense text model.

    Input: token ids (B, L) int64 in [0, 256], any L >= 1. Output: logits (B, num_classes).
    """

    def __init__(self, num_classes: int, cell: str = "lstm", embed_dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, embed_dim, padding_idx=0)
        self.head = RecurrentHead(cell, embed_dim, hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens))


class TextConv(nn.Module):
    """Byte-level convolutional text classifier (DP default).

    Input: token ids (B, L) int64 in [0, 256], any L >= 1. Output: logits (B, num_classes).
    """

    def __init__(self, num_classes: int, embed_dim: int = 64, activation: str = "tanh") -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, embed_dim, padding_idx=0)
        self.convs = nn.Sequential(
            ConvBlock1d(embed_dim, 128, activation=activation),
            ConvBlock1d(128, 128, activation=activation),
            ConvBlock1d(128, 128, 3, activation=activation),
        )
        self.head = GlobalPoolHead(128, num_classes, activation=activation)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(self.embedding(tokens).transpose(1, 2)))


# Separators of `TextHashedWordChar`'s words: ASCII white space and ASCII punctuation (bytes).
_SEPARATOR_BYTES = tuple(b" \t\n\v\f\r") + tuple(range(33, 48)) + tuple(range(58, 65)) \
    + tuple(range(91, 97)) + tuple(range(123, 127))


class TextHashedWordChar(nn.Module):
    """Fixed hashed word 1-2-grams + char 3-5-grams, L2-normalised, and a linear head.

    A DP-first text model (Tramer & Boneh, ICLR 2021, "Differentially Private Learning Needs
    Better Features"): the features are a fixed function of each record alone, nothing is
    fitted and there is no vocabulary, so they carry nothing of any other record or node and
    cost no privacy; only the Linear head (`buckets` x `num_classes` + bias) is trained by
    DP-SGD, and since each feature vector has L2 norm <= 1, each example's gradient norm is
    bounded (weight part <= sqrt(2), with the bias <= 2), so clipping discards little.

    What is hashed, over the UTF-8 bytes lower-cased in ASCII (A-Z -> a-z; other bytes kept):
    - words: maximal runs of bytes that are not separators (ASCII white space, ASCII
      punctuation; padding and the ends of the record also end a word); non-ASCII bytes are
      word bytes. Word unigrams and bigrams of consecutive words ("free cash" gives the
      bigram (free, cash) whatever separators lie between them);
    - char 3-, 4- and 5-grams over the whole lower-cased byte string, spaces and punctuation
      included (like scikit-learn's analyzer="char", without its white-space folding; not
      "char_wb"), never spanning padding.
    Each n-gram gets a polynomial hash modulo the prime 2**31 - 1 with a salt per kind (word
    1-gram, word 2-gram, char n), mixed once more and taken modulo `buckets`; the features
    are the bucket counts, divided by their L2 norm (a record with no n-gram gives zeros).

    Input: token ids (B, L) int64, UTF-8 byte + 1, 0 = padding
    (`shared_models.datasets.text.encode_bytes`), any L >= 1; padding may sit anywhere.
    Output: logits (B, num_classes). `features(tokens)`: (B, buckets) float32.
    Vectorised over records (loops over n only); nothing is learnt or stored but the head.

    Buckets default to 2**14, not the issue's 2**16: Opacus materialises (B, num_classes,
    buckets) per-sample gradients, and at batch 128 a DP step cost ~115 ms at 2**14 against
    ~365 ms at 2**16 (plain step 28 / 80 ms; 2 shared CPUs). Measured on SMS Spam (5
    Dirichlet(0.5) nodes, 15 rounds x 2 local epochs, batch 128, lr 8, SecAgg+, one run each),
    test accuracy (AUC): epsilon 8: 2**14 0.956 (0.970), 2**16 0.943 (0.968), 2**16 at batch
    256 lr 16 0.960 (0.967); epsilon 3: 2**14 0.908 (0.897), 2**16 0.921 (0.934): mixed, so
    the cheaper width. `ngram-linear` (byte 1-3-grams, 4096 buckets) reached 0.963 (0.989)
    and 0.948 (0.970) in the same settings, so it stays the default. Raw counts (the issue's
    prototype) were not tried here.
    """

    PRIME = 2_147_483_647  # 2**31 - 1: products of two residues fit in int64
    BASE = 1_000_003  # polynomial base of byte strings (char n-grams, words)
    PAIR = 999_999_937  # multiplier of the first word's hash in a bigram
    MIX = 1_103_515_245  # final multiplier before the bucket
    SALTS = {"word1": 11, "word2": 22, 3: 33, 4: 44, 5: 55}

    def __init__(self, num_classes: int, buckets: int = 2**14, char_ngrams: tuple[int, ...] = (3, 4, 5)) -> None:
        super().__init__()
        if not set(char_ngrams) <= {3, 4, 5}:
            raise ValueError(f"char n-grams must be among (3, 4, 5), got {char_ngrams}")
        self.buckets, self.char_ngrams = buckets, char_ngrams
        self.linear = nn.Linear(buckets, num_classes)

    def _bucket(self, code: torch.Tensor, salt: int) -> torch.Tensor:
        return ((code + salt * 7_919) % self.PRIME * self.MIX % self.PRIME + salt) % self.buckets

    def _powers(self, n: int, device: torch.device) -> torch.Tensor:
        """BASE**0..BASE**(n-1) modulo PRIME, int64 (computed per call: the model keeps no integer buffers)."""
        return torch.tensor([pow(self.BASE, i, self.PRIME) for i in range(n)], dtype=torch.int64, device=device)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, buckets) float32: L2-normalised hashed word 1-2-gram and char 3-5-gram counts."""
        batch, length = tokens.shape
        device = tokens.device
        tokens = tokens.long()
        upper = (tokens >= ord("A") + 1) & (tokens <= ord("Z") + 1)
        low = torch.where(upper, tokens + 32, tokens)  # ids stay byte + 1
        feats = torch.zeros(batch, self.buckets, device=device)

        # Char n-grams over the lower-cased bytes, never across padding: the n-gram at i is
        # valid when no padding lies in i..i+n-1 (cumulative padding counts).
        padding = torch.cat([torch.zeros(batch, 1, dtype=torch.int64, device=device),
                             (low == 0).long().cumsum(dim=1)], dim=1)  # (B, L+1)
        powers = self._powers(max(self.char_ngrams, default=1), device).tolist()
        for n in self.char_ngrams:
            if length < n:
                continue
            width = length - n + 1
            code = sum(low[:, j:j + width] * powers[j] for j in range(n)) % self.PRIME
            valid = (padding[:, n:] == padding[:, :width]).float()
            feats.scatter_add_(1, self._bucket(code, self.SALTS[n]), valid)

        # Words: runs of non-separator bytes. Each word's hash sum_j byte_j * BASE**j mod PRIME,
        # j counted from the word's start, gathered into word slots 0..(words - 1) per record.
        separator_ids = torch.tensor((0,) + tuple(b + 1 for b in _SEPARATOR_BYTES), device=device)
        in_word = ~torch.isin(low, separator_ids)
        before = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=device), in_word[:, :-1]], dim=1)
        start = in_word & ~before
        position = torch.arange(length, device=device).expand(batch, length)
        word_start = torch.where(start, position, torch.full_like(position, -1)).cummax(dim=1).values
        offset = (position - word_start).clamp(0, length - 1)  # before any word: unused
        term = torch.where(in_word, low * torch.take(self._powers(length, device), offset) % self.PRIME, 0)
        slot = (start.long().cumsum(dim=1) - 1).clamp(min=0)
        word_hash = torch.zeros(batch, length, dtype=torch.int64, device=device).scatter_add_(1, slot, term) % self.PRIME
        words = start.sum(dim=1, keepdim=True)  # (B, 1)
        index = torch.arange(length, device=device).expand(batch, length)
        feats.scatter_add_(1, self._bucket(word_hash, self.SALTS["word1"]), (index < words).float())
        if length > 1:
            pair = (word_hash[:, :-1] * self.PAIR + word_hash[:, 1:]) % self.PRIME
            feats.scatter_add_(1, self._bucket(pair, self.SALTS["word2"]), (index[:, 1:] < words).float())
        return feats.div_(feats.norm(dim=1, keepdim=True).clamp(min=1e-12))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(tokens))
