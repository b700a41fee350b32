"""Report-generation metrics with pycocoevalcap 1.2's definitions: BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D.

The values are pycocoevalcap's, computed faster:

* BLEU, ROUGE-L and CIDEr are re-implemented with numpy over integer n-gram ids (no per-pair Python loops); they
  equal ``Bleu(4)``, ``Rouge()`` and ``Cider()`` to float rounding (|diff| < 1e-12 in practice; BLEU is exact).
* METEOR runs pycocoevalcap's own ``meteor-1.5.jar`` (``-stdio -l en -norm``, the same ``SCORE`` / ``EVAL`` lines
  pycocoevalcap sends, so the corpus value is the jar's aggregate over all segments' statistics). Four things make
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

import functools
import gzip
import hashlib
import html
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import zipfile
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepmedix import store

KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
BLEU_N = 4
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BleuScorer constants
SEGMENTS_PER_JVM = 400  # a JVM start costs about as much CPU as aligning this many report-length segments
# C1 only: these runs are too short to earn back C2 compilation (measured: about 30 % less CPU per JVM)
# the stock jar reads numbers with java.util.Scanner, which a comma-decimal default locale breaks: pin one
JAVA_OPTS = ("-Xmx2G", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Duser.language=en", "-Duser.country=US")


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
        raise ValueError(f"{n} predictions but {len(references)} references")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, rs in enumerate(refs):
        if not rs:
            raise ValueError(f"pair {i}: no reference")
        if not all(isinstance(r, str) for r in rs):
            raise ValueError(f"pair {i}: references must be strings")
    return refs


def _check(predictions: list[str], references: list[str] | list[list[str]]) -> list[list[str]]:
    refs = _as_refs(references, len(predictions))
    if not predictions:
        raise ValueError("no pairs to score")
    if not all(isinstance(p, str) for p in predictions):
        raise ValueError("predictions must be strings")
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


# --------------------------------------------------------------------------------------------- METEOR

def _meteor_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap.meteor.meteor")
    if spec is None or spec.origin is None:
        raise RuntimeError("METEOR needs pycocoevalcap (pip install pycocoevalcap==1.2) and Java")
    if shutil.which("java") is None:
        raise RuntimeError("METEOR needs a Java runtime ('java' on PATH)")
    return Path(spec.origin).parent


FAST_CLASSES = True  # use the drop-in classes of meteor_java/ when javac can build them (False: the stock jar)
_JAVA_SOURCES = Path(__file__).with_name("meteor_java")


@functools.lru_cache(maxsize=4)
def _fast_classes(jar: Path) -> Path | None:
    """The compiled drop-in classes (a class-path folder) for this jar, built with ``javac`` on first use and
    cached; None when there is no ``javac`` or the build fails (the stock jar is used then)."""
    javac = shutil.which("javac")
    sources = sorted(_JAVA_SOURCES.glob("*.java"))
    if javac is None or not sources:
        return None
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sources) + str(jar.stat().st_size).encode()).hexdigest()
    out = store.cache_root() / "meteor" / f"classes-{digest[:16]}"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
        r = subprocess.run([javac, "-nowarn", "-source", "8", "-target", "8", "-cp", str(jar), "-d", str(tmp),
                            *map(str, sources)], capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        try:
            tmp.rename(out)
        except OSError:  # built by another process meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return None
    return out


def _index_dir(table: Path) -> Path:
    with table.open("rb") as f:
        head = hashlib.sha1(f.read(1 << 22)).hexdigest()[:16]
    return store.cache_root() / "meteor" / f"paraphrase-en-{table.stat().st_size}-{head}"


def _build_index(table: Path, out: Path) -> None:
    """Index of the paraphrase table: words, phrases as word ids, entries as phrase-id pairs (in table order)."""
    words: dict[bytes, int] = {}
    phrases: dict[bytes, int] = {}
    toks, ptr, entries = array("I"), array("q", [0]), array("i")
    with gzip.open(table, "rb") as f:
        lines = iter(f)
        for _prob, a, b in zip(lines, lines, lines):  # the jar reads and ignores the probability line
            for p in (a, b):
                pid = phrases.get(p)
                if pid is None:
                    pid = phrases[p] = len(phrases)
                    toks.extend(words.setdefault(w, len(words)) for w in p.split())
                    ptr.append(len(toks))
                entries.append(pid)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    (tmp / "words.txt").write_bytes(b"\n".join(words))
    np.save(tmp / "toks.npy", np.frombuffer(toks, np.uint32).astype(np.uint16 if len(words) <= 1 << 16 else np.uint32))
    np.save(tmp / "ptr.npy", np.frombuffer(ptr, np.int64).astype(np.int32 if len(toks) < 1 << 31 else np.int64))
    np.save(tmp / "entries.npy", np.frombuffer(entries, np.int32).reshape(-1, 2))
    try:
        tmp.rename(out)
    except OSError:  # built by another process meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


def _text_vocab(texts: list[str]) -> set[bytes]:
    """Every token METEOR's ``-norm`` normaliser can make of these texts, and more: each whitespace token, lower-
    cased, quote/dash/SGML-normalised, and every piece of it cut at the edges of its non-alphanumeric chars."""
    out: set[bytes] = set()
    for tok in set(" ".join(texts).lower().split()):
        forms = {tok, tok.translate(_QUOTES).replace("``", '"').replace("''", '"'), html.unescape(tok)}
        for form in forms:
            if form.isalnum():
                out.add(form.encode())
                continue
            cuts = sorted({0, len(form)} | {i for i, c in enumerate(form) if not c.isalnum()}
                          | {i + 1 for i, c in enumerate(form) if not c.isalnum()})
            out.update(form[a:b].encode() for i, a in enumerate(cuts) for b in cuts[i + 1:] if b - a <= 64)
    return out


def _normalised_vocab(jar_dir: Path, texts: list[str]) -> set[bytes]:
    """The words the jar's own ``-norm`` normaliser (``edu.cmu.meteor.util.Normalizer``, lower-casing) makes of
    these texts (raw segments' parts): it also rewrites tokens in ways :func:`_text_vocab` does not foresee (e.g.
    ``u.s.`` -> ``us``), and a word missing from the vocabulary would lose its synonym and paraphrase entries."""
    if not texts:
        return set()
    out = subprocess.run(["java", *JAVA_OPTS, "-cp", "meteor-1.5.jar", "edu.cmu.meteor.util.Normalizer", "en",
                          "true"], cwd=jar_dir, input="".join(t + "\n" for t in texts).encode(),
                         capture_output=True, check=False)
    if out.returncode != 0:
        raise RuntimeError("meteor-1.5.jar's Normalizer failed (exit "
                           f"{out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}")
    return set(out.stdout.lower().split())


def _filtered_paraphrases(vocab: set[bytes], table: Path, dest: Path) -> Path:
    """The paraphrase-table entries whose words are all in ``vocab`` (the only ones that can match), as a table
    file for the jar's ``-a``; the full table when the index cannot be built or cached."""
    index = _index_dir(table)
    try:
        if not index.exists():
            index.parent.mkdir(parents=True, exist_ok=True)
            _build_index(table, index)
    except OSError:
        return table
    words = (index / "words.txt").read_bytes().split(b"\n")
    toks = np.load(index / "toks.npy", mmap_mode="r")
    ptr = np.load(index / "ptr.npy", mmap_mode="r")
    entries = np.load(index / "entries.npy", mmap_mode="r")
    known = np.fromiter((w in vocab for w in words), bool, len(words))
    unknown = np.concatenate([[0], np.cumsum(~known[toks])])
    phrase_ok = unknown[ptr[1:]] == unknown[ptr[:-1]]
    kept = entries[phrase_ok[entries[:, 0]] & phrase_ok[entries[:, 1]]]
    text = {int(p): b" ".join(words[t] for t in toks[ptr[p]:ptr[p + 1]]) for p in np.unique(kept)}
    path = dest / "paraphrase-filtered.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b"".join(b"1\n%s\n%s\n" % (text[a], text[b]) for a, b in kept.tolist()))
    return path


# WordNet morphology of the jar's SynonymDictionary.morph: (suffix, replacement) rules tried on a word
_MORPH_RULES = ((b"s", b""), (b"ses", b"s"), (b"xes", b"x"), (b"zes", b"z"), (b"ches", b"ch"), (b"shes", b"sh"),
                (b"men", b"man"), (b"ies", b"y"), (b"es", b"e"), (b"es", b""), (b"ed", b"e"), (b"ed", b""),
                (b"ing", b"e"), (b"ing", b""), (b"er", b""), (b"est", b""), (b"er", b"e"), (b"est", b"e"))


@functools.lru_cache(maxsize=2)
def _wordnet(jar: Path) -> tuple[dict[bytes, bytes], dict[bytes, list[bytes]], bytes]:
    """The jar's English WordNet files: word -> synset-id line, inflected form -> base forms, raw exceptions."""
    with zipfile.ZipFile(jar) as z:
        synsets = z.read("synonym/english.synsets").split(b"\n")
        exceptions = z.read("synonym/english.exceptions")
    bases: dict[bytes, list[bytes]] = {}
    lines = exceptions.split(b"\n")
    for base, forms in zip(lines[0::2], lines[1::2]):
        for form in forms.split():
            bases.setdefault(form, []).append(base)
    return dict(zip(synsets[0::2], synsets[1::2])), bases, exceptions


def _filtered_synonyms(vocab: set[bytes], jar: Path, dest: Path) -> Path:
    """A synonym directory for the jar's ``-d`` giving the same synonym matches on this corpus, faster.

    The jar matches two different words when their synset sets (of the word and of its morphological bases)
    intersect, testing every synset of every word pair. Only synsets reachable from at least two corpus words can
    make such an intersection, so the others are dropped from every entry; entries are kept for every word the
    morphology may look up (all rule candidates of the corpus words), so that its lookups answer as before."""
    synsets, bases, exceptions = _wordnet(jar)
    reach: dict[int, int] = {}
    keys: set[bytes] = set()
    for word in vocab:
        cands = {word, *bases.get(word, ())}
        for suffix, repl in _MORPH_RULES:
            if word.endswith(suffix):
                cands.update((word[:len(word) - len(suffix)] + repl, word[:len(word) - len(suffix)] + repl + b"ful"))
        found = cands.intersection(synsets)
        keys |= found
        for sid in {int(i) for k in found for i in synsets[k].split()}:
            reach[sid] = reach.get(sid, 0) + 1
    shared = {sid for sid, n in reach.items() if n > 1}
    out = dest / "synonym"
    out.mkdir()
    (out / "english.synsets").write_bytes(b"".join(
        k + b"\n" + b" ".join(i for i in synsets[k].split() if int(i) in shared) + b"\n" for k in sorted(keys)))
    (out / "english.exceptions").write_bytes(exceptions)
    (out / "english.relations").write_bytes(b"")  # named by the jar, never read
    return out


_PLAIN_TOKEN = r"[a-z0-9]+(?:[-.][a-z0-9]+)*"
_PLAIN = re.compile(rf"(?:{_PLAIN_TOKEN}(?: {_PLAIN_TOKEN})*)?")
_RM_DASH = re.compile(r"([0-9a-z.])-([0-9a-z])")  # the jar's Normalizer.r_rm_dash on ASCII


def _plain(text: str) -> str | None:
    """What the jar's ``-norm`` makes of a text of single-spaced tokens of a-z / 0-9 with inner "-" and "."
    (inner hyphens become spaces, nothing else changes), or None for any other text. Such segments are sent
    normalised with ``-lower``, which skips the normaliser's two dozen regular expressions (a third of the jar's
    time); checked against the jar's Normalizer and its statistics in the tests."""
    return _RM_DASH.sub(r"\1 \2", text) if _PLAIN.fullmatch(text) else None


def _segment(hyp: str, refs: list[str]) -> tuple[str, bool]:
    """The SCORE line for the jar and whether it is pre-normalised (for ``-lower``) or raw (for ``-norm``). Raw:
    pycocoevalcap's line (``|||`` dropped from the prediction; here also from references, and newlines folded, so
    that no text can break the line protocol)."""
    plain = [_plain(t) for t in (hyp, *refs)]
    if all(t is not None for t in plain):
        return " ||| ".join(("SCORE", *plain[1:], plain[0])), True

    def clean(s: str) -> str:
        return s.replace("\n", " ").replace("\r", " ").replace("|||", "")
    return " ||| ".join(("SCORE", " ||| ".join(map(clean, refs)), clean(hyp).replace("  ", " "))), False


def _chunks(segments: dict[str, bool], jobs: int | None) -> list[tuple[bool, list[str]]]:
    """Segments (line -> pre-normalised) split for the JVMs: each chunk all pre-normalised or all raw, with about
    equal work (characters; raw lines weigh 1.5 for the normaliser), one JVM per 400 segments, at most one per CPU
    (or ``jobs`` JVMs), and at least one per kind present."""
    groups = [[line for line, plain in segments.items() if plain is kind] for kind in (True, False)]
    cost = [sum(map(len, g)) * w for g, w in zip(groups, (1.0, 1.5))]
    if jobs is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        jobs = min(cpus, math.ceil(len(segments) / SEGMENTS_PER_JVM))
    out = []
    for kind, group, c in zip((True, False), groups, cost):
        if group:
            n = max(1, min(len(group), round(jobs * c / sum(cost))))
            sizes = np.cumsum([len(line) for line in group])
            cut = np.searchsorted(sizes, np.linspace(0, sizes[-1], n + 1))
            cut[0], cut[-1] = 0, len(group)
            out += [(kind, group[cut[j]:cut[j + 1]]) for j in range(n) if cut[j + 1] > cut[j]]
    return out


class _Jvm:
    """One ``meteor-1.5.jar -stdio`` process; lines are streamed to it by a writer thread."""

    def __init__(self, jar_dir: Path, paraphrases: Path, synonyms: Path, normalised: bool) -> None:
        fast = _fast_classes(jar_dir / "meteor-1.5.jar") if FAST_CLASSES else None
        classpath = ["-cp", f"{fast}{os.pathsep}meteor-1.5.jar", "Meteor"] if fast else ["-jar", "meteor-1.5.jar"]
        cmd = ["java", *JAVA_OPTS, *classpath, "-", "-", "-stdio", "-l", "en",
               "-lower" if normalised else "-norm", "-a", str(paraphrases), "-d", str(synonyms)]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)

    def send(self, lines: list[str], close: bool) -> threading.Thread:
        def write() -> None:
            try:
                self.proc.stdin.write("".join(line + "\n" for line in lines).encode())
                self.proc.stdin.flush()
                if close:
                    self.proc.stdin.close()
            except BrokenPipeError:  # the JVM died: read() says why
                pass
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    def read(self, n: int) -> list[str]:
        out = [self.proc.stdout.readline().decode().strip() for _ in range(n)]
        if out and not out[-1]:
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"meteor-1.5.jar stopped early (exit {self.proc.poll()}): {tail}")
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


class _MeteorRun:
    """METEOR on a corpus, started on construction (the JVMs align in the background); :meth:`result` waits for
    the corpus score (the jar's aggregate, as pycocoevalcap reports it) and the per-pair segment scores."""

    def __init__(self, hyps: list[str], refs: list[list[str]], jobs: int | None) -> None:
        jar_dir = _meteor_dir()
        segments = [_segment(h, rs) for h, rs in zip(hyps, refs)]
        self.lines = [line for line, _ in segments]
        chunks = _chunks(dict(segments), jobs)
        self.unique = [line for _, chunk in chunks for line in chunk]
        self.tmp = tempfile.TemporaryDirectory(prefix="meteor-")
        self.jvms: list[_Jvm] = []
        self.pool = ThreadPoolExecutor(len(chunks))
        try:
            vocab, tmp = _text_vocab(hyps + [r for rs in refs for r in rs]), Path(self.tmp.name)
            raw = [part for line, plain in segments if not plain for part in line.split(" ||| ")[1:]]
            vocab |= _normalised_vocab(jar_dir, raw)
            paraphrases = _filtered_paraphrases(vocab, jar_dir / "data" / "paraphrase-en.gz", tmp)
            synonyms = _filtered_synonyms(vocab, jar_dir / "meteor-1.5.jar", tmp)
            for kind, _ in chunks:  # one by one: a failed start leaves the started ones in self.jvms to close
                self.jvms.append(_Jvm(jar_dir, paraphrases, synonyms, kind))
            self.writers = [jvm.send(chunk, close=j > 0) for j, (jvm, (_, chunk)) in enumerate(zip(self.jvms, chunks))]
            self.parts = [self.pool.submit(jvm.read, len(chunk)) for jvm, (_, chunk) in zip(self.jvms, chunks)]
        except BaseException:
            self.close()
            raise

    def result(self) -> tuple[float, np.ndarray]:
        try:
            stats = dict(zip(self.unique, (s for part in self.parts for s in part.result())))
            for w in self.writers:
                w.join()
            self.jvms[0].send(["EVAL ||| " + " ||| ".join(stats[line] for line in self.lines)], close=True).join()
            scores = self.jvms[0].read(len(self.lines) + 1)
        finally:
            self.close()
        return float(scores[-1]), np.array([float(s) for s in scores[:-1]])

    def close(self) -> None:
        for jvm in self.jvms:
            jvm.stop()
        self.pool.shutdown()
        self.tmp.cleanup()


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
    one more when the corpus mixes plain and other text, see :func:`_plain`).
    Raises ValueError on a length mismatch, no pairs, a pair without references or non-string text.
    """
    refs = _check(predictions, references)
    run = _MeteorRun(predictions, refs, meteor_jobs) if meteor else None
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
                raise ValueError(f"{where}: missing field '{field}'")
        pid, pred, ref = row["id"], row["prediction"], row["reference"]
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise ValueError(f"{where}: field 'id' must be a string or an integer")
        if not isinstance(pred, str):
            raise ValueError(f"{where}: field 'prediction' must be a string")
        if isinstance(ref, str):
            ref = [ref]
        if not isinstance(ref, list) or not ref or not all(isinstance(r, str) for r in ref):
            raise ValueError(f"{where}: field 'reference' must be a string or a non-empty list of strings")
        key = str(pid)
        if key in seen:
            raise ValueError(f"{where}: duplicate id {pid!r} (first on line {seen[key]})")
        seen[key] = no
        ids.append(key)
        preds.append(pred)
        refs.append(ref)
    if not ids:
        raise ValueError(f"{path}: no pairs")
    return ids, preds, refs


def score_pairs_file(path: str | Path, *, meteor: bool = True) -> dict[str, float | int]:
    """Corpus scores of a pairs file (see :func:`read_pairs`) after :func:`tokenize` of every text, plus ``n``
    (the number of pairs). What ``deepmedix eval reports PAIRS.jsonl --json`` prints."""
    _, preds, refs = read_pairs(path)
    out: dict[str, float | int] = corpus_scores([tokenize(p) for p in preds],
                                                [[tokenize(r) for r in rs] for rs in refs], meteor=meteor)
    out["n"] = len(preds)
    return out
