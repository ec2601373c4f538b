"""Offline byte-level text domains for the ``bytegpt`` zoo family (no downloads).

* ``code``  - Python standard-library source files (they ship with every Python);
* ``prose`` - the English language reference in ``pydoc_data.topics`` (ships with Python);
* ``json``  - procedurally generated JSON records;
* ``arith`` - procedurally generated integer arithmetic, one equation per line;
* ``csv``   - procedurally generated CSV rows (id, region, amount, date);
* ``logs``  - procedurally generated server log lines.

Train and validation text are disjoint: stdlib files and pydoc topics are split by document (every
tenth one is validation); generated domains use different seeds.
"""
from __future__ import annotations

import glob
import json
import os
import random
import sysconfig

DOMAINS = ("code", "prose", "json", "arith", "csv", "logs")


def _split(docs: list[str], split: str) -> list[str]:
    return [d for i, d in enumerate(docs) if (i % 10 == 0) == (split == "val")]


def _take(docs: list[str], limit: int) -> str:
    out, n = [], 0
    for d in docs:
        out.append(d)
        n += len(d)
        if n >= limit:
            break
    return "".join(out)[:limit]


def _code(split: str, limit: int, seed: int) -> str:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    docs = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                docs.append(fh.read() + "\n")
        except (OSError, UnicodeDecodeError):
            continue
    docs = _split(docs, split)
    random.Random(seed).shuffle(docs)
    return _take(docs, limit)


def _prose(split: str, limit: int, seed: int) -> str:
    from pydoc_data import topics

    docs = _split([topics.topics[k] + "\n" for k in sorted(topics.topics)], split)
    random.Random(seed).shuffle(docs)
    return _take(docs, limit)


_SYL = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fa", "gu", "ha", "ji", "po", "ze"]
_TAGS = ["red", "green", "blue", "new", "old", "fast", "slow", "admin", "guest", "beta"]


def _json(split: str, limit: int, seed: int) -> str:
    def line(r: random.Random) -> str:
        name = lambda k: "".join(r.choice(_SYL) for _ in range(k)).capitalize()  # noqa: E731
        return json.dumps({"id": r.randint(1, 99999), "name": f"{name(2)} {name(3)}",
                           "email": f"{name(2).lower()}@{name(2).lower()}.org", "age": r.randint(18, 90),
                           "active": r.random() < 0.5, "score": round(r.uniform(0, 100), 2),
                           "tags": r.sample(_TAGS, r.randint(0, 3))}) + "\n"

    return _lines(seed * 2 + (split == "val"), limit, line)


def _arith(split: str, limit: int, seed: int) -> str:
    def line(r: random.Random) -> str:
        a, b, op = r.randint(0, 999), r.randint(0, 999), r.choice("+-*")
        if op == "*":
            b = r.randint(0, 99)
        return f"{a}{op}{b}={a + b if op == '+' else a - b if op == '-' else a * b}\n"

    return _lines(seed * 2 + 1000 + (split == "val"), limit, line)


def _lines(seed: int, limit: int, make_line) -> str:
    rng = random.Random(seed)
    out, n = [], 0
    while n < limit:
        line = make_line(rng)
        out.append(line)
        n += len(line)
    return "".join(out)[:limit]


def _csv(split: str, limit: int, seed: int) -> str:
    regions = ["north", "south", "east", "west", "central"]
    return _lines(seed * 2 + 2000 + (split == "val"), limit, lambda r: (
        f"{r.randint(1, 99999)},{r.choice(regions)},{r.uniform(0, 5000):.2f},"
        f"20{r.randint(10, 29)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d},{r.choice('YN')}\n"))


def _logs(split: str, limit: int, seed: int) -> str:
    levels = ["INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG"]
    services = ["api", "db", "auth", "cache", "worker"]
    verbs = ["GET", "POST", "PUT", "DELETE"]
    return _lines(seed * 2 + 3000 + (split == "val"), limit, lambda r: (
        f"[{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}] {r.choice(levels)} "
        f"{r.choice(services)}: {r.choice(verbs)} /v{r.randint(1, 3)}/{r.choice(services)}/{r.randint(1, 999)} "
        f"status={r.choice([200, 200, 201, 404, 500])} took={r.randint(1, 900)}ms\n"))


_MAKERS = {"code": _code, "prose": _prose, "json": _json, "arith": _arith, "csv": _csv, "logs": _logs}


def text(domain: str, split: str, limit: int, seed: int = 0) -> bytes:
    """Up to ``limit`` bytes of ``domain`` text for ``split`` ('train' or 'val'), ASCII-clean."""
    s = _MAKERS[domain](split, limit, seed)
    return s.encode("ascii", "replace")[:limit]
