"""The demo world: seeded, and a version's clicks depend only on what its ranking put first."""

from __future__ import annotations

import random

from bench.world import CATALOGUE, CLICK_MATCH, CLICK_OTHER, TASTES, World


def test_same_seed_same_world_and_slates():
    a, b = World(users=200, seed=3), World(users=200, seed=3)
    assert a.users == b.users
    ra, rb = random.Random(5), random.Random(5)
    assert [a.slate(ra) for _ in range(50)] == [b.slate(rb) for _ in range(50)]


def test_profiles_never_name_the_hidden_genre_and_slates_hold_one_favourite():
    world = World(users=500)
    rng = random.Random(1)
    for user in world.users:
        assert user.favourite not in user.profile.lower()
        assert sum(line in user.profile for line in TASTES[user.favourite]) == 1
    for _ in range(500):
        slate = world.slate(rng)
        assert slate.genres.count(slate.user.favourite) == 1
        assert len(set(slate.genres)) == len(slate.genres) == world.slate_size
        assert all(item in CATALOGUE[g] for item, g in zip(slate.items, slate.genres))


def test_click_probability_is_the_hidden_truth_of_the_top_item_only():
    world = World(users=100)
    slate = world.slate(random.Random(2))
    favourite = slate.genres.index(slate.user.favourite)
    other = next(i for i in range(len(slate.genres)) if i != favourite)
    assert slate.click_probability(favourite) == CLICK_MATCH
    assert slate.click_probability(other) == CLICK_OTHER
    rng = random.Random(3)
    clicks = sum(World.click(slate, favourite, rng) for _ in range(20_000)) / 20_000
    assert abs(clicks - CLICK_MATCH) < 0.015


def test_request_body_is_a_v2_request_with_the_slate():
    slate = World(users=10).slate(random.Random(4))
    body = slate.body(top_k=1)
    assert body["inputs"][0]["data"] == [slate.user.profile]
    assert body["inputs"][1]["data"] == list(slate.items)
    assert body["parameters"] == {"top_k": 1}
