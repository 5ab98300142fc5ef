"""PrefixCache bookkeeping: which entry a request starts from, what is kept, what is evicted."""

from stoker.workers.prefix_cache import MIN_SHARE, PrefixCache, common_prefix

A = list(range(100, 140))  # 40 tokens
B = list(range(500, 530))  # 30 tokens, nothing in common with A


def test_the_longest_shared_prefix_wins_and_short_ones_do_not_count():
    c = PrefixCache(budget=1000, first_id=4, slots=8)
    assert c.admit(A) == (4, [])
    assert c.admit(B) == (5, [])
    entry, n = c.best(A[:30] + [1, 2, 3])
    assert entry.seq_id == 4 and n == 30
    assert c.best(A[: MIN_SHARE - 1] + [7] * 20) == (None, 0)  # too short to share
    assert c.best([1] * 50) == (None, 0)


def test_an_entry_extended_by_a_newer_one_is_replaced_by_it():
    c = PrefixCache(budget=1000, first_id=4, slots=8)
    c.admit(A)
    seq_id, dropped = c.admit(A + [1, 2, 3])  # a chat that went on from A
    assert dropped == [4] and list(c.entries) == [seq_id] and c.tokens == len(A) + 3


def test_least_recently_used_entries_go_first_to_stay_within_the_budget_and_slots():
    c = PrefixCache(budget=80, first_id=4, slots=8)
    c.admit(A)  # 40
    c.admit(B)  # 30: 70 held
    c.best(A)  # A used after B
    seq_id, dropped = c.admit(list(range(900, 925)))  # 25 more: over 80, B (older use) goes
    assert dropped == [5] and seq_id == 5 and c.tokens == 65
    assert c.admit(list(range(0, 81))) == (None, [])  # larger than the whole budget: not kept
    small = PrefixCache(budget=10_000, first_id=2, slots=2)
    small.admit(A)
    small.admit(B)
    assert small.admit(list(range(900, 925)))[1] == [2]  # out of ids: the oldest goes


def test_nothing_is_kept_with_no_budget():
    c = PrefixCache(budget=0, first_id=4, slots=0)
    assert c.admit(A) == (None, []) and c.best(A) == (None, 0)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


def test_an_entry_that_exactly_fills_the_budget_is_kept_and_evictions_free_what_they_held():
    c = PrefixCache(budget=70, first_id=4, slots=8)
    c.admit(A)  # 40
    assert c.admit(B) == (5, []) and c.tokens == 70  # 40 + 30 = the budget: both stay
    c2 = PrefixCache(budget=100, first_id=0, slots=8)
    for start in (0, 1000, 2000):
        c2.admit(list(range(start, start + 30)))  # 90 held
    seq_id, dropped = c2.admit(list(range(5000, 5050)))  # 50 more: two of the oldest must go
    assert dropped == [0, 1] and c2.tokens == 80


def test_the_bounds_min_share_and_budget_are_inclusive():
    c = PrefixCache(budget=len(A), first_id=4, slots=8)
    assert c.admit(A[:MIN_SHARE])[0] is not None  # exactly MIN_SHARE tokens: kept
    assert c.admit(A)[0] is not None  # exactly the budget: kept (it replaces the shorter one)
    assert c.best(A[:MIN_SHARE] + [0] * 10)[1] == MIN_SHARE  # exactly MIN_SHARE shared: used
    assert c.best(A[: MIN_SHARE - 1] + [0] * 10) == (None, 0)
    assert PrefixCache(budget=100, first_id=0, slots=8).admit(A[: MIN_SHARE - 1]) == (None, [])


def test_of_two_entries_sharing_as_much_the_first_found_is_used():
    c = PrefixCache(budget=1000, first_id=0, slots=8)
    c.admit(A[:20] + [1] * 5)
    c.admit(A[:20] + [2] * 5)
    entry, n = c.best(A[:20] + [3] * 5)
    assert n == 20 and entry.seq_id == 0
