"""Report-generation metrics with pycocoevalcap 1.2's definitions: BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D.

The values are pycocoevalcap's, computed faster:

* BLEU, ROUGE-L and CIDEr are re-implemented with numpy over integer n-gram ids (no per-pair Python loops); they
  equal ``Bleu(4)``, ``Rouge()`` and ``Cider()`` to float rounding (|diff| < 1e-12 in practice; BLEU is exact).
* METEOR (:mod:`deepmedix.eval.meteor`) runs pycocoevalcap's own ``meteor-1.5.jar`` (``-stdio -l en -norm``, the
  same ``SCORE`` / ``EVAL`` lines pycocoevalcap sends, so the corpus value is the jar's aggregate over all segments'
  statistics). Five things make
  it faster without changing a value: (1) the jar gets only the paraphrase-table entries whose words all occur in
  this corpus (no other entry can match; loading the full 61 MB table is most of a cold start), cut from an index
  of the table built once and cached under ``$DEEPMEDIX_CACHE/meteor``; (2) its WordNet synonym sets are cut to the
  synsets that two corpus words can share (the synonym stage tests every synset of every word pair: about a third
  of the alignment time); (3) the segments are aligned by several JVMs in parallel (one per 400 distinct segments,
  at most one per CPU) with the lines streamed instead of one round trip per segment; (4) identical (prediction,
  references) segments are aligned once; (5) when a JDK's ``javac`` is there, three of the jar's classes are replaced
  by drop-in versions compiled once from ``meteor_java/`` (cached under ``$DEEPMEDIX_CACHE/meteor``) and put before
  the jar on the class path: the synonym matcher keeps each word's synsets as a sorted int array instead of looking
  two Hashtables up for every word pair, the Snowball stemmer wrapper remembers stems (each is a pure function of
  the word), and the statistics class reads an EVAL line without a java.util.Scanner per segment; the same matches
  in the same order, so the same statistics and scores (the tests compare SCORE and EVAL output line for line with
  the stock jar). Without ``javac`` the stock jar runs. BLEU, ROUGE-L and CIDEr are computed while the JVMs align.

Inputs are used as given, exactly as pycocoevalcap uses them: BLEU and CIDEr split on whitespace, ROUGE-L splits on
single spaces (so ``""`` is one empty token: an empty prediction against an empty reference scores ROUGE-L 1.0,
against anything else 0.0; BLEU, CIDEr and METEOR score it 0). Raw report text should go through :func:`tokenize`
first, as pycocoevalcap's usual pipeline runs its PTBTokenizer first (:func:`score_pairs_file` does).

Per-pair values for resampling (e.g. a bootstrap over pairs) come from :func:`pair_scores`: ROUGE-L, CIDEr and the
jar's METEOR segment scores per pair, and BLEU's sufficient statistics per pair, which :func:`corpus_bleu` turns
into corpus BLEU (sum the rows of any resample). CIDEr's document frequencies come from the references of the
scored corpus, as in pycocoevalcap, so a resample's mean of per-pair CIDEr is not a re-run of CIDEr on it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepmedix import store
from deepmedix.errors import InputError

KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
BLEU_N = 4
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BleuScorer constants


# --------------------------------------------------------------------------------------------- tokenize

_ABBREVIATIONS = frozenset("mr mrs ms dr prof st jr sr vs cf etc fig figs dept inc co corp ltd".split())
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})
_PTB_TOKEN = re.compile(r"""
      -[lr][rsc]b-                         # PTB bracket tokens already in the text
    | (?:[^\W\d_]\.){2,}                   # e.g. i.e. p.m. u.s.
    | \d+(?:[.,:/]\d+)+                    # 4.5  2,000  3:45  01/02/2023
    | n't | '(?:s|re|ve|ll|d|m)\b          # contraction pieces already split off
    | \w+(?:[-'/.]\w+)*\.?                 # words, inner - ' / . kept ("plate-like", "and/or"); a final . see below
    | [^\s\w.,;:!?"'`-]                    # other symbols are tokens of their own: % $ # & * + = < > ( ) ...
    """, re.VERBOSE)
_LETTER_DOTS = re.compile(r"(?:[^\W\d_]\.){2,}")
_CONTRACTION = re.compile(r"(.+?)(n't|'(?:s|re|ve|ll|d|m))")


def tokenize(text: str) -> str:
    """Report text as pycocoevalcap's usual pipeline sees it: lower-cased, split like its PTBTokenizer, with the
    punctuation tokens it removes (. , ; : ! ? - -- ... and quotes) removed; tokens joined by single spaces.

    Kept as PTB keeps them: inner hyphens, slashes and periods ("plate-like", "and/or", "4.5", "normal.no"),
    numbers with , : / ("2,000", "3:45"), "e.g."-style and a few title abbreviations ("dr.", "vs.", "etc."),
    contractions split off ("is n't", "patient 's"), symbols as tokens ("5 %", "n = 3"), and brackets as
    "-lrb-" / "-rrb-" / "-lsb-" ... (PTBTokenizer lower-cases its "-LRB-" and pycocoevalcap's punctuation list
    is upper-case, so they survive there too). An approximation of PTB for rarer cases (its full abbreviation
    list, "no. 3", "?!"). On text that is already lower-case and space-tokenised without punctuation it is the
    identity up to whitespace.
    """
    out = []
    for tok in _PTB_TOKEN.findall(text.lower().translate(_QUOTES)):
        if tok in _BRACKETS:
            out.append(_BRACKETS[tok])
            continue
        if tok.endswith(".") and tok[:-1] not in _ABBREVIATIONS and not _LETTER_DOTS.fullmatch(tok):
            tok = tok[:-1]
        m = _CONTRACTION.fullmatch(tok) if "'" in tok else None
        out.extend(m.groups() if m else (tok,))
    return " ".join(out)


# --------------------------------------------------------------------------------------------- inputs

def _as_refs(references: list[str] | list[list[str]], n: int) -> list[list[str]]:
    if len(references) != n:
        raise InputError(f"{n} predictions but {len(references)} references")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, rs in enumerate(refs):
        if not rs:
            raise InputError(f"pair {i}: no reference")
        if not all(isinstance(r, str) for r in rs):
            raise InputError(f"pair {i}: references must be strings")
    return refs


def _check(predictions: list[str], references: list[str] | list[list[str]]) -> list[list[str]]:
    refs = _as_refs(references, len(predictions))
    if not predictions:
        raise InputError("no pairs to score")
    if not all(isinstance(p, str) for p in predictions):
        raise InputError("predictions must be strings")
    return refs


# --------------------------------------------------------------------------------------------- n-grams

def _ids(sentences: list[list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids over one vocabulary (int64), sentence lengths, vocabulary size."""
    lens = np.fromiter(map(len, sentences), np.int64, len(sentences))
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for s in sentences for w in s), np.int64, int(lens.sum()))
    return ids, lens, len(vocab)


def _ngram_counts(sentences: list[list[str]], n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per order k = 1..n: (sentence, n-gram id, count, number of ids), one row per distinct n-gram of a sentence,
    sorted by (sentence, id). N-gram ids are shared by all sentences and never cross a sentence end."""
    ids, lens, nvocab = _ids(sentences)
    sent = np.repeat(np.arange(len(sentences), dtype=np.int64), lens)
    end = np.repeat(np.cumsum(lens), lens)
    pos = np.arange(len(ids), dtype=np.int64)
    gram, ngrams = ids, nvocab
    out = []
    for k in range(1, n + 1):
        if k > 1:
            valid = pos + (k - 1) < end
            key = gram[valid] * nvocab + ids[np.flatnonzero(valid) + (k - 1)]
            uniq, inv = np.unique(key, return_inverse=True)
            gram = np.full(len(ids), -1, np.int64)
            gram[valid] = inv
            ngrams = len(uniq)
        ok = gram >= 0
        rows, counts = np.unique(sent[ok] * ngrams + gram[ok], return_counts=True)
        out.append((rows // ngrams, rows % ngrams, counts, ngrams))
    return out


def _gather(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``values`` (rows) at the position of each query in the sorted ``keys``; zeros for queries not there."""
    out = np.zeros((len(queries),) + values.shape[1:], values.dtype)
    if len(keys):
        pos = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
        found = keys[pos] == queries
        out[found] = values[pos[found]]
    return out


# --------------------------------------------------------------------------------------------- BLEU, CIDEr

def _bleu_cider(hyps: list[str], refs: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair BLEU statistics (see :func:`pair_scores`) and per-pair CIDEr-D, as pycocoevalcap's scorers."""
    n_pairs = len(hyps)
    owner = np.repeat(np.arange(n_pairs), [len(r) for r in refs])
    split = [s.split() for s in hyps] + [r.split() for rs in refs for r in rs]
    lens = np.fromiter(map(len, split), np.int64, len(split))
    hlen, rlen = lens[:n_pairs], lens[n_pairs:]
    first = np.concatenate([[0], np.cumsum([len(r) for r in refs])[:-1]])

    # BLEU: effective reference length 'closest' (ties: the shorter), clipped matches, guesses
    base = int(rlen.max(initial=0)) + 1  # min over (|ref len - pred len|, ref len), as one integer key
    closest = np.minimum.reduceat(np.abs(rlen - hlen[owner]) * base + rlen, first) % base
    stats = np.zeros((n_pairs, 2 + 2 * BLEU_N), np.int64)
    stats[:, 0], stats[:, 1] = hlen, closest

    # CIDEr-D: tf-idf vectors per order, idf from this corpus's references, clipped cosine, length penalty
    log_n = np.log(float(n_pairs))
    dots = np.zeros((len(rlen), BLEU_N))
    hnorm = np.zeros((n_pairs, BLEU_N))
    rnorm = np.zeros((len(rlen), BLEU_N))
    for k, (sent, gram, count, ngrams) in enumerate(_ngram_counts(split, BLEU_N)):
        is_h = sent < n_pairs
        hs, hg, hc = sent[is_h], gram[is_h], count[is_h]
        rs, rg, rc = sent[~is_h] - n_pairs, gram[~is_h], count[~is_h]
        pair_keys, inv = np.unique(owner[rs] * ngrams + rg, return_inverse=True)
        maxc = np.zeros(len(pair_keys), np.int64)
        np.maximum.at(maxc, inv, rc)
        clipped = np.minimum(hc, _gather(pair_keys, maxc, hs * ngrams + hg))
        stats[:, 2 + k] = np.bincount(hs, weights=clipped, minlength=n_pairs).astype(np.int64)
        stats[:, 2 + BLEU_N + k] = np.maximum(0, hlen - k)

        df = np.bincount(pair_keys % ngrams, minlength=ngrams).astype(np.float64)
        weight = log_n - np.log(np.maximum(1.0, df))
        hv, rv = hc * weight[hg], rc * weight[rg]
        hnorm[:, k] = np.sqrt(np.bincount(hs, weights=hv * hv, minlength=n_pairs))
        rnorm[:, k] = np.sqrt(np.bincount(rs, weights=rv * rv, minlength=len(rlen)))
        hv_at = _gather(hs * ngrams + hg, hv, owner[rs] * ngrams + rg)
        dots[:, k] = np.bincount(rs, weights=np.minimum(hv_at, rv) * rv, minlength=len(rlen))
    denom = hnorm[owner] * rnorm
    val = np.where(denom != 0, dots / np.where(denom != 0, denom, 1.0), dots)
    delta = (np.maximum(hlen - 1, 0)[owner] - np.maximum(rlen - 1, 0)).astype(np.float64)  # bigram counts
    penalty = {d: np.e ** (-(d ** 2) / (2 * CIDER_SIGMA ** 2)) for d in np.unique(delta).tolist()}
    val *= np.array([penalty[d] for d in delta.tolist()])[:, None]
    summed = np.zeros((n_pairs, BLEU_N))
    np.add.at(summed, owner, val)
    cider = summed.mean(axis=1) / np.bincount(owner, minlength=n_pairs) * 10.0
    return stats, cider


def corpus_bleu(stats: np.ndarray) -> list[float]:
    """BLEU-1..4 from per-pair statistics (rows of :attr:`PairScores.bleu_stats`, summed here), exactly as
    pycocoevalcap's ``BleuScorer.compute_score(option='closest')``."""
    tot = np.asarray(stats, np.int64).sum(axis=0).tolist()
    testlen, reflen, correct, guess = tot[0], tot[1], tot[2:2 + BLEU_N], tot[2 + BLEU_N:]
    bleus, bleu = [], 1.0
    for k in range(BLEU_N):
        bleu *= float(correct[k] + _TINY) / (guess[k] + _SMALL)
        bleus.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return bleus


# --------------------------------------------------------------------------------------------- ROUGE-L

def _rouge_l(hyps: list[str], refs: list[list[str]]) -> np.ndarray:
    """Per-pair ROUGE-L F (beta 1.2; best precision and best recall over the references), as pycocoevalcap's
    ``Rouge``. LCS lengths come from a bit-parallel LCS (Hyyrö) run on all (prediction, reference) rows at once."""
    n_pairs = len(hyps)
    counts = [len(r) for r in refs]
    owner = np.repeat(np.arange(n_pairs), counts)
    ids, lens, nvocab = _ids([s.split(" ") for s in hyps] + [r.split(" ") for rs in refs for r in rs])
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    hlen, rlen = lens[:n_pairs][owner], lens[n_pairs:]
    rows = len(rlen)
    words = int(-(-int(rlen.max()) // 64))

    # match masks: for each (row, token) the bits of the reference positions holding that token
    rrow = np.repeat(np.arange(rows), rlen)
    rpos = np.arange(int(rlen.sum())) - np.repeat(starts[n_pairs:] - starts[n_pairs], rlen)
    keys, inv = np.unique(rrow * nvocab + ids[starts[n_pairs]:], return_inverse=True)
    masks = np.zeros((len(keys), words), np.uint64)
    np.bitwise_or.at(masks, (inv, rpos // 64), np.left_shift(np.uint64(1), (rpos % 64).astype(np.uint64)))

    # one step per prediction position, over the rows whose prediction is that long (longest first)
    order = np.argsort(-hlen, kind="stable")
    hstart = starts[:n_pairs][owner][order]
    bits = np.full((rows, words), np.uint64(0xFFFFFFFFFFFFFFFF))
    for i in range(int(hlen.max())):
        live = int(np.searchsorted(-hlen[order], -i, side="left"))
        r = order[:live]
        v = bits[r]
        u = v & _gather(keys, masks, r * nvocab + ids[hstart[:live] + i])
        carry = np.zeros(live, np.uint64)
        add = np.empty_like(v)
        for w in range(words):
            s = v[:, w] + u[:, w]
            s2 = s + carry
            carry = ((s < v[:, w]) | (s2 < s)).astype(np.uint64)
            add[:, w] = s2
        bits[r] = add | (v & ~u)
    in_word = np.clip(rlen[:, None] - 64 * np.arange(words), 0, 64).astype(np.uint64)  # reference bits per word
    low = np.where(in_word == 64, np.uint64(0xFFFFFFFFFFFFFFFF),
                   np.left_shift(np.uint64(1), np.minimum(in_word, np.uint64(63))) - np.uint64(1))
    lcs = rlen - np.bitwise_count(bits & low).sum(axis=1)

    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    prec = np.maximum.reduceat(lcs / hlen.astype(np.float64), first)
    rec = np.maximum.reduceat(lcs / rlen.astype(np.float64), first)
    b2 = ROUGE_BETA ** 2
    ok = (prec != 0) & (rec != 0)
    return np.where(ok, ((1 + b2) * prec * rec) / np.where(ok, rec + b2 * prec, 1.0), 0.0)


# --------------------------------------------------------------------------------------------- API

@dataclass(frozen=True)
class PairScores:
    """Per-pair values for N pairs. ``bleu_stats``: int64 (N, 10) rows [prediction length, closest reference
    length, clipped matches for n = 1..4, n-gram counts for n = 1..4] (see :func:`corpus_bleu`); ``rouge_l``,
    ``cider``: (N,) float; ``meteor``: (N,) segment scores from the jar, or None; ``meteor_corpus``: the jar's
    corpus METEOR (from all segments' summed statistics, not the mean of ``meteor``), or None."""

    bleu_stats: np.ndarray
    rouge_l: np.ndarray
    cider: np.ndarray
    meteor: np.ndarray | None
    meteor_corpus: float | None

    def corpus(self) -> dict[str, float]:
        """The corpus scores, as pycocoevalcap reports them; no ``meteor`` key when METEOR was not run."""
        out = dict(zip(KEYS[:BLEU_N], corpus_bleu(self.bleu_stats)))
        if self.meteor_corpus is not None:
            out["meteor"] = self.meteor_corpus
        out["rouge_l"] = float(np.mean(self.rouge_l))
        out["cider"] = float(np.mean(self.cider))
        return out


def pair_scores(predictions: list[str], references: list[str] | list[list[str]], *, meteor: bool = True,
                meteor_jobs: int | None = None) -> PairScores:
    """Per-pair scores of predictions against their reference (a string) or references (a list of strings).

    ``meteor_jobs``: METEOR JVMs run in parallel (default: one per 400 distinct segments, at most one per CPU;
    one more when the corpus mixes plain and other text, see :func:`deepmedix.eval.meteor._plain`).
    Raises ValueError on a length mismatch, no pairs, a pair without references or non-string text.
    """
    refs = _check(predictions, references)
    from deepmedix.eval.meteor import MeteorRun

    run = MeteorRun(predictions, refs, meteor_jobs) if meteor else None
    try:
        stats, cider = _bleu_cider(predictions, refs)
        rouge = _rouge_l(predictions, refs)
    except BaseException:
        if run:
            run.close()
        raise
    met_corpus, met = run.result() if run else (None, None)
    return PairScores(stats, rouge, cider, met, met_corpus)


def corpus_scores(predictions: list[str], references: list[str] | list[list[str]], *, meteor: bool = True,
                  meteor_jobs: int | None = None) -> dict[str, float]:
    """``bleu1``..``bleu4``, ``meteor``, ``rouge_l``, ``cider`` over the corpus, equal to pycocoevalcap 1.2's
    ``Bleu(4)``, ``Meteor()``, ``Rouge()``, ``Cider()`` on the same texts (used as given; see :func:`tokenize`).
    ``meteor=False`` skips METEOR (no Java needed) and leaves its key out."""
    return pair_scores(predictions, references, meteor=meteor, meteor_jobs=meteor_jobs).corpus()


def read_pairs(path: str | Path) -> tuple[list[str], list[str], list[list[str]]]:
    """Ids, predictions and references of a JSONL file of {"id", "prediction", "reference"} lines (reference: a
    string or a non-empty list of strings; blank lines skipped). Every line is checked before anything is
    returned: ValueError names ``file:line`` and the field, or a duplicated id and both its lines."""
    ids: list[str] = []
    preds: list[str] = []
    refs: list[list[str]] = []
    seen: dict[str, int] = {}
    for no, where, row in store.jsonl_objects(path, expected="an object with id, prediction, reference"):
        for field in ("id", "prediction", "reference"):
            if field not in row:
                raise InputError(f"{where}: missing field '{field}'")
        pid, pred, ref = row["id"], row["prediction"], row["reference"]
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise InputError(f"{where}: field 'id' must be a string or an integer")
        if not isinstance(pred, str):
            raise InputError(f"{where}: field 'prediction' must be a string")
        if isinstance(ref, str):
            ref = [ref]
        if not isinstance(ref, list) or not ref or not all(isinstance(r, str) for r in ref):
            raise InputError(f"{where}: field 'reference' must be a string or a non-empty list of strings")
        key = str(pid)
        if key in seen:
            raise InputError(f"{where}: duplicate id {pid!r} (first on line {seen[key]})")
        seen[key] = no
        ids.append(key)
        preds.append(pred)
        refs.append(ref)
    if not ids:
        raise InputError(f"{path}: no pairs")
    return ids, preds, refs


def score_pairs_file(path: str | Path, *, meteor: bool = True) -> dict[str, float | int]:
    """Corpus scores of a pairs file (see :func:`read_pairs`) after :func:`tokenize` of every text, plus ``n``
    (the number of pairs). What ``deepmedix eval reports PAIRS.jsonl --json`` prints."""
    _, preds, refs = read_pairs(path)
    out: dict[str, float | int] = corpus_scores([tokenize(p) for p in preds],
                                                [[tokenize(r) for r in rs] for rs in refs], meteor=meteor)
    out["n"] = len(preds)
    return out
