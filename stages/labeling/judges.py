"""The judges of an evaluation, measured against human preferences they never trained on.

A win rate is only as good as its judge. Each judge's held-out agreement is counted here as
(hits, pairs): pairs a human ordered, hits where the judge ordered them the same way (ties half).
`stages/preference/validity.py` turns the counts into an accuracy with a 95% CI and a verdict.

- the gold rule's **simulated human labeler** (the embedded task): against an independent simulated
  human (another seed of the same noise) on the held-out comparisons' responses (their own labels
  come from the same seeded labeler and would agree by construction); without held-out comparisons
  (rlaif_direct), on the evaluation's own (policy, SFT) pairs, which are harder to tell apart the
  closer the policy stays to SFT;
- the **AI labeler** (the win judge where there is no gold rule): against the held-out comparisons
  when humans labelled them, never against the AI's own labels;
- an **evaluation reward model**: against the held-out comparisons when humans labelled them
  (`stages/preference/scorers.py: pairwise_counts`).

Comparisons the AI labeler labelled carry its soft preferences (`prefs`): they are not human.
"""

from __future__ import annotations

from stages.labeling.labelers import SimulatedLabeler
from stages.preference.rankings import pair_agreement
from stages.settings.labeling import LabelerConfig


def human_labelled(rows: list[dict]) -> list[dict]:
    """The held-out comparisons, if people (or the simulated human labeler) ranked them; else none."""
    return [] if any("prefs" in r for r in rows) else rows


def independent_human(noise: float, target_len: int, gold: str | None, seed: int = 1) -> SimulatedLabeler:
    """A second simulated human: the same noise as the win labeler, its own draws."""
    return SimulatedLabeler(LabelerConfig(noise=noise, seed=seed), target_len, gold)


def simulated_agreement(
    judge: SimulatedLabeler, human: SimulatedLabeler, items: list[tuple[str, list[str]]]
) -> tuple[float, int]:
    """(hits, pairs) of `judge` against `human` on (prompt, responses) items; pairs the human ties drop."""
    hits, total = 0.0, 0
    for prompt, responses in items:
        h, n = pair_agreement(judge.noisy_scores(prompt, responses), human.rank(prompt, responses))
        hits, total = hits + h, total + n
    return hits, total


def ranks_agreement(judged: list[list[int]], truth: list[list[int]]) -> tuple[float, int]:
    """(hits, pairs) of a judge's rankings against the true rankings of the same responses."""
    hits, total = 0.0, 0
    for mine, theirs in zip(judged, truth):
        h, n = pair_agreement([-r for r in mine], theirs)  # rank 0 is best: its score is highest
        hits, total = hits + h, total + n
    return hits, total


def labeler_ceiling(rows: list[dict], gold) -> float | None:
    """Agreement of the noise-free gold rule with the labels (ties count half); None without a gold
    rule or for rows it cannot score (a dataset's conversations)."""
    if gold is None or not all(isinstance(r["prompt"], str) for r in rows):
        return None
    agree, total = 0.0, 0
    try:
        for row in rows:
            hits, pairs = pair_agreement([gold(row["prompt"], y) for y in row["responses"]], row["ranks"])
            agree, total = agree + hits, total + pairs
    except ValueError:  # a prompt the gold rule does not know (comparisons from a file)
        return None
    return agree / total if total else None


def judge_agreement(rows: list[dict], target_len: int, noise: float, gold) -> dict[str, float] | None:
    """Pairwise agreement of AI-labelled rankings with the gold rule and the simulated human labeler;
    None without a gold rule or unless the rows carry the AI labeler's soft preferences."""
    if gold is None or not rows or not all("prefs" in r and isinstance(r["prompt"], str) for r in rows):
        return None
    human = SimulatedLabeler(LabelerConfig(noise=noise), target_len)
    agree = {"gold": [0.0, 0], "human": [0.0, 0]}
    for row in rows:
        scores = {"gold": [gold(row["prompt"], y) for y in row["responses"]]}
        scores["human"] = human.noisy_scores(row["prompt"], row["responses"])
        for name, values in scores.items():
            hits, pairs = pair_agreement(values, row["ranks"])
            agree[name][0] += hits
            agree[name][1] += pairs
    return {f"agreement_{k}": h / max(1, n) for k, (h, n) in agree.items()}
