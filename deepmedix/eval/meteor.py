"""METEOR 1.5 as pycocoevalcap computes it: its own ``meteor-1.5.jar`` (``-stdio -l en -norm``, the same ``SCORE``
/ ``EVAL`` lines pycocoevalcap sends, so the corpus value is the jar's aggregate over all segments' statistics),
run faster without changing a value (see :mod:`deepmedix.eval.nlg` for how). :class:`MeteorRun` starts
the JVMs on construction; :meth:`MeteorRun.result` waits for the corpus score and the per-segment scores.
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
from pathlib import Path

import numpy as np

from deepmedix import store
from deepmedix.errors import MissingToolError
from deepmedix.eval.nlg import _QUOTES

SEGMENTS_PER_JVM = 400  # a JVM start costs about as much CPU as aligning this many report-length segments
# C1 only: these runs are too short to earn back C2 compilation (measured: about 30 % less CPU per JVM)
# the stock jar reads numbers with java.util.Scanner, which a comma-decimal default locale breaks: pin one
JAVA_OPTS = ("-Xmx2G", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Duser.language=en", "-Duser.country=US")


def _meteor_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap.meteor.meteor")
    if spec is None or spec.origin is None:
        raise MissingToolError("METEOR needs pycocoevalcap (pip install pycocoevalcap==1.2) and Java")
    if shutil.which("java") is None:
        raise MissingToolError("METEOR needs a Java runtime ('java' on PATH)")
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


class MeteorRun:
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
