"""The demo world: simulated users with hidden tastes, a catalogue of items, and clicks.

Every user has one hidden favourite genre. What the recommender sees is the user's profile
text: one line about the taste, written in words that never name the genre, among four lines
about the rest of their life (work, pets, errands). Each request shows the user a slate of
candidate items (always one from the favourite genre, the rest from others); the model ranks
them; the user looks at the top item and clicks with a probability that depends only on
whether it is of their favourite genre (hidden ground truth):

    P(click | top item) = CLICK_MATCH if genre(top item) == favourite else CLICK_OTHER

So a version's click rate is CLICK_OTHER + (CLICK_MATCH - CLICK_OTHER) x (how often its top
item is of the favourite genre), a property of the model's actual rankings and nothing else:
no rate is ever given to a version. `python -m bench.world` measures each model config's
match rate offline, which predicts the lift the live A/B test should find.

Everything is seeded: the same seed gives the same users, slates and clicks.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CATALOGUE", "CLICK_MATCH", "CLICK_OTHER", "WORSE_V2", "Slate", "User", "World"]

CLICK_MATCH = 0.50
CLICK_OTHER = 0.05
# `make demo-worse`'s v2: a "latency fix" that embeds the whole profile in one pass again, cut
# to 10 tokens; a hot patch of v2's hyperparameters, honestly worse on this world.
WORSE_V2 = {"profile_scoring": "whole", "max_length": 10}

# genre -> items (what the catalogue says) and taste lines (how users talk about it, never
# with the items' words).
CATALOGUE: dict[str, list[str]] = {
    "space": [
        "an epic space opera about a rebel fleet",
        "a documentary on the first crewed mission to Mars",
        "a novel about astronauts stranded on a distant moon",
        "a series about a starship exploring unknown galaxies",
    ],
    "cooking": [
        "a pasta masterclass with an Italian chef",
        "a baking competition of home bakers",
        "a street food tour across Bangkok",
        "a cookbook of slow-cooked winter stews",
    ],
    "football": [
        "highlights of the Champions League final",
        "a documentary about a legendary goalkeeper",
        "a season inside a struggling football club",
        "a tactics breakdown of the world cup",
    ],
    "jazz": [
        "a live recording of a saxophone quartet",
        "a biography of a bebop trumpet player",
        "a late-night jazz piano session",
        "a history of swing big bands",
    ],
    "gardening": [
        "a guide to growing tomatoes on a balcony",
        "a show about restoring an overgrown cottage garden",
        "a handbook of pruning fruit trees",
        "a documentary on rare orchids",
    ],
    "crime": [
        "a detective thriller set in foggy London",
        "a true crime podcast about an unsolved heist",
        "a courtroom drama about a wrongful conviction",
        "a noir mystery of a missing heiress",
    ],
    "history": [
        "a documentary on the fall of the Roman empire",
        "a biography of Napoleon",
        "a series about medieval castles and their sieges",
        "a book on the ancient Egyptian pharaohs",
    ],
    "fitness": [
        "a thirty-day strength training programme",
        "a guide to running your first marathon",
        "a morning yoga routine for beginners",
        "a high intensity interval workout series",
    ],
}

TASTES: dict[str, list[str]] = {
    "space": [
        "stares at the night sky and dreams about rockets and other planets",
        "never misses news about NASA launches and distant stars",
    ],
    "cooking": [
        "spends every weekend trying new recipes in the kitchen",
        "loves tasting dishes from restaurants and markets everywhere",
    ],
    "football": [
        "plays five-a-side every week and follows the league table",
        "cheers for their team at the stadium every Saturday",
    ],
    "jazz": [
        "collects old vinyl records of improvised music with horns",
        "goes to small clubs to hear live musicians improvise at night",
    ],
    "gardening": [
        "grows vegetables and flowers in the backyard",
        "spends hours planting seeds and caring for plants",
    ],
    "crime": [
        "loves solving whodunits and reading about detectives",
        "is fascinated by murders, police investigations and trials",
    ],
    "history": [
        "reads about emperors, old wars and ancient civilisations",
        "visits museums and ruins to learn about the past",
    ],
    "fitness": [
        "trains at the gym before work and tracks every workout",
        "is always preparing for the next race or exercise challenge",
    ],
}

LIFE: list[str] = [
    "works long shifts as a nurse at the city hospital",
    "has two cats and a very old dog",
    "commutes by train every morning",
    "is saving money to buy a flat",
    "looks after their grandmother on Sundays",
    "recently moved to a new town",
    "works as an accountant in a busy office",
    "is learning Spanish on their phone",
    "drives the kids to school each day",
    "volunteers at the local library",
    "is renovating the bathroom",
    "works from home as a software developer",
]


@dataclass(frozen=True)
class User:
    user_id: str
    favourite: str  # hidden: the recommender never sees it
    profile: str  # what the recommender sees


@dataclass(frozen=True)
class Slate:
    """One request: a user and the candidate items shown, with each item's genre."""

    user: User
    items: tuple[str, ...]
    genres: tuple[str, ...]

    def body(self, top_k: int = 1) -> dict[str, Any]:
        """The V2 inference request for this slate."""
        return {
            "inputs": [
                {"name": "user", "datatype": "BYTES", "shape": [1], "data": [self.user.profile]},
                {"name": "items", "datatype": "BYTES", "shape": [len(self.items)],
                 "data": list(self.items)},
            ],
            "parameters": {"top_k": top_k},
        }  # fmt: skip

    def click_probability(self, top_index: int) -> float:
        """The hidden truth: depends only on the genre of the item the model put first."""
        match = self.genres[top_index] == self.user.favourite
        return CLICK_MATCH if match else CLICK_OTHER


class World:
    """A seeded population and slate generator."""

    def __init__(
        self, users: int = 5000, slate_size: int = 6, life_lines: int = 4, seed: int = 7
    ) -> None:
        rng = random.Random(seed)
        genres = sorted(CATALOGUE)
        self.slate_size = slate_size
        self.users: list[User] = []
        for i in range(users):
            favourite = rng.choice(genres)
            lines = rng.sample(LIFE, life_lines) + [rng.choice(TASTES[favourite])]
            rng.shuffle(lines)
            profile = "Someone who " + ", ".join(lines[:-1]) + " and " + lines[-1] + "."
            self.users.append(User(f"user-{i}", favourite, profile))

    def slate(self, rng: random.Random) -> Slate:
        """A random user, one item of their favourite genre and slate_size - 1 items of
        other genres, shuffled."""
        user = rng.choice(self.users)
        others = [g for g in CATALOGUE if g != user.favourite]
        genres = [user.favourite] + rng.sample(others, self.slate_size - 1)
        items = [rng.choice(CATALOGUE[g]) for g in genres]
        order = list(range(len(genres)))
        rng.shuffle(order)
        return Slate(user, tuple(items[i] for i in order), tuple(genres[i] for i in order))

    @staticmethod
    def click(slate: Slate, top_index: int, rng: random.Random) -> bool:
        return rng.random() < slate.click_probability(top_index)


def offline_match_rates(
    configs: dict[str, tuple[Path, dict[str, Any]]], slates: int = 2000, seed: int = 11
) -> dict[str, Any]:
    """Each (model config, hyperparameter overrides)'s share of slates whose top item is of the
    user's favourite genre, and the click rate that implies, measured with the adapter itself
    (no Ray)."""
    import numpy as np

    from app.adapters import adapter_class
    from app.config import load_model_config
    from app.serving.artifacts import resolve_artifact

    world = World()
    rng = random.Random(seed)
    sample = [world.slate(rng) for _ in range(slates)]
    result = {}
    for name, (path, overrides) in configs.items():
        config = load_model_config(path)
        adapter_type = adapter_class(config.adapter)
        directory = resolve_artifact(config.artifact, config.base_dir())
        hyperparameters = adapter_type.parse_hyperparameters(
            {**config.hyperparameters, **overrides}
        )
        adapter = adapter_type(directory, hyperparameters, threads=2)
        hits = 0
        for start in range(0, len(sample), 64):
            chunk = sample[start : start + 64]
            batch = [{"user": np.array([s.user.profile], dtype=object),
                      "items": np.array(s.items, dtype=object)} for s in chunk]  # fmt: skip
            outputs = adapter.predict(batch, [{"top_k": 1}] * len(chunk))
            for s, out in zip(chunk, outputs):
                hits += s.genres[int(out["ranking"][0, 0])] == s.user.favourite
        match = hits / len(sample)
        result[name] = {
            "match_rate": round(match, 4),
            "expected_click_rate": round(CLICK_OTHER + (CLICK_MATCH - CLICK_OTHER) * match, 4),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("configs/models/recommender"))
    parser.add_argument("--slates", type=int, default=2000)
    args = parser.parse_args()
    configs = {
        "v1": (args.models / "v1.yaml", {}),
        "v2": (args.models / "v2.yaml", {}),
        "v2-worse (make demo-worse)": (args.models / "v2.yaml", WORSE_V2),
    }
    rates = offline_match_rates(configs, args.slates)
    base = rates["v1"]["expected_click_rate"]
    for row in rates.values():
        row["expected_lift_over_v1"] = round(row["expected_click_rate"] / base - 1, 4)
    print(json.dumps(rates, indent=2))


if __name__ == "__main__":
    main()
