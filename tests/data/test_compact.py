"""The compact tables behind curation's dedupe state, against plain Python sets and dicts."""

import random

from deepmedix.data.compact import U64Map, U64MultiMap
from deepmedix.data.images import PhashIndex


def test_u64map_matches_a_dict_across_merges():
    rng = random.Random(1)
    m, ref = U64Map(tail=64), {}
    keys = [rng.getrandbits(64) for _ in range(3000)] + [0, 2**64 - 1]
    for i, k in enumerate(keys + keys[:500]):  # repeats keep their first value
        assert m.setdefault(k, i) == ref.setdefault(k, i)
        if i % 97 == 0:
            probe = rng.getrandbits(64)
            assert (probe in m) == (probe in ref) and m.get(probe) == ref.get(probe)
    assert len(m) == len(ref)
    assert all(m.get(k) == v for k, v in ref.items())
    assert list(m) == sorted(ref)


def test_u64multimap_keeps_every_value_in_order():
    m, ref = U64MultiMap(tail=50), {}
    rng = random.Random(2)
    for i in range(2000):
        k = rng.randrange(300)
        m.add(k, i)
        ref.setdefault(k, []).append(i)
    assert all(m.get(k) == ref.get(k, []) for k in range(400))


def test_phash_index_finds_within_the_distance_and_honours_skip():
    rng = random.Random(3)
    for d in (0, 2, 3, 8, 64):
        idx = PhashIndex(d)
        hs = [rng.getrandbits(256) for _ in range(2000)]
        for i, h in enumerate(hs):
            idx.add(h, i)
        idx.add(hs[5], 999)  # already there: keeps its first owner
        assert len(idx) == 2000 and hs[5] in idx and idx.find(hs[5]) == (hs[5], 5)
        near = hs[7]
        for b in rng.sample(range(256), d):
            near ^= 1 << b
        assert idx.find(near) == (hs[7], 7)
        assert idx.find(near, skip=lambda owner: owner == 7) is None or d == 64
        if d < 64:
            far = hs[7]
            for b in rng.sample(range(256), d + 8):
                far ^= 1 << b
            assert idx.find(far) is None
