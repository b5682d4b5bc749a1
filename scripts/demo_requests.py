"""Send a few recommendation requests and show which version served each, and its ranking."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import httpx

USERS = [
    "loves science fiction films and space exploration",
    "home cook who watches baking and pasta tutorials",
    "follows football, basketball and the olympics",
]
ITEMS = [
    "an epic space opera among distant stars",
    "a cooking show about fresh italian pasta",
    "highlights of the champions league final",
    "a documentary on jazz in new orleans",
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    served = Counter()
    with httpx.Client(base_url=args.url, timeout=30) as client:
        for i in range(args.requests):
            user = USERS[i % len(USERS)]
            body = {
                "inputs": [
                    {"name": "user", "datatype": "BYTES", "shape": [1], "data": [user]},
                    {"name": "items", "datatype": "BYTES", "shape": [len(ITEMS)], "data": ITEMS},
                ],
                "parameters": {"top_k": 2},
            }
            r = client.post("/v2/models/recommender/infer", json=body)
            if r.status_code != 200:
                print(f"request {i}: HTTP {r.status_code}: {r.text}", file=sys.stderr)
                return 1
            version = r.headers["x-model-version"]
            served[version] += 1
            if i < len(USERS):
                ranking = next(o for o in r.json()["outputs"] if o["name"] == "ranking")["data"]
                print(f"  {version}  {user!r}\n        -> {[ITEMS[j] for j in ranking]}")
    split = ", ".join(f"{v}: {n}" for v, n in sorted(served.items()))
    print(f"  {args.requests} requests, served by {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
