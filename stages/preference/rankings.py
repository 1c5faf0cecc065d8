"""K-way rankings: the (winner, loser) pairs they imply, ranks from scores, their token ids, and how
far a scorer agrees with them. Pure helpers of the reward model, DPO, evaluate and the labelers."""

from __future__ import annotations

from stages.data.tokens import prompt_ids, response_ids


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All (winner, loser) index pairs implied by ranks (0 = best); tied responses give no pair."""
    k = len(ranks)
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]


def encode_rankings(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [response ids, EOS where finished]) per ranking row (`stages/data/tokens.py`)."""
    return [
        (
            prompt_ids(tokenizer, r["prompt"]),
            [response_ids(tokenizer, y, f) for y, f in zip(r["responses"], r["finished"])],
        )
        for r in rows
    ]


def pair_agreement(scores, ranks: list[int]) -> tuple[float, int]:
    """(hits, pairs): how many (winner, loser) pairs of `ranks` the scores order right, ties half."""
    hits = [float(scores[w] > scores[l]) + 0.5 * float(scores[w] == scores[l]) for w, l in ranking_pairs(ranks)]
    return sum(hits), len(hits)


def preference_pairs(encoded: list[tuple[list[int], list[list[int]]]], rows: list[dict]) -> list[dict]:
    """K-way rankings to their (chosen, rejected) pairs of token ids, ties dropped: C(K,2) per ranking."""
    return [
        {"prompt_ids": p, "chosen_ids": responses[w], "rejected_ids": responses[l]}
        for (p, responses), row in zip(encoded, rows)
        for w, l in ranking_pairs(row["ranks"])
    ]


def ranks_from_scores(scores: list[float]) -> list[int]:
    """0 for the highest score; equal scores share a rank."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]
