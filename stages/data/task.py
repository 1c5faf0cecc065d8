"""The embedded default task: a synthetic instruction task with a hidden gold scoring rule.

Prompts ask for a few words about a topic ("write about the garden"). The gold rule stands in for
human preferences (InstructGPT's labelers judged helpfulness, tone and concision):

    gold(prompt, response) = on_topic + tone - length_penalty

- on_topic: fraction of the response's nouns that belong to the prompt's topic (0 without nouns);
- tone: VADER's compound sentiment of the response, a lexicon of human-rated valences (Hutto and
  Gilbert 2014), in [-1, 1];
- length_penalty: min(1, |words - target_len| / target_len).

Demonstrations are drawn with a per-row quality in [0, 1], so SFT imitates a mixed-quality
distribution and leaves headroom for RLHF. Everything is deterministic in the seed.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

TOPICS: dict[str, tuple[str, ...]] = {
    "garden": ("flower", "seed", "soil", "rose", "tree", "leaf"),
    "ocean": ("wave", "fish", "sand", "boat", "shell", "tide"),
    "music": ("song", "drum", "piano", "melody", "guitar", "choir"),
    "kitchen": ("bread", "soup", "oven", "spoon", "pie", "salt"),
    "space": ("star", "moon", "planet", "rocket", "comet", "orbit"),
    "school": ("book", "teacher", "lesson", "pencil", "desk", "class"),
    "city": ("street", "bus", "tower", "bridge", "market", "park"),
    "forest": ("wolf", "pine", "moss", "owl", "trail", "fern"),
}
POSITIVE = ("good", "great", "lovely", "happy", "wonderful", "nice", "beautiful", "amazing")
NEGATIVE = ("bad", "awful", "sad", "terrible", "ugly", "boring", "nasty", "horrible")
NEUTRAL = ("the", "a", "is", "and", "very", "with", "some", "old", "big", "small")
TEMPLATES = ("write about the {}", "tell me about the {}", "describe the {}", "say something about the {}")

NOUN_TOPIC = {noun: topic for topic, nouns in TOPICS.items() for noun in nouns}


def vocabulary() -> list[str]:
    """Every word the task can produce, prompts included (the tokenizer is trained on these)."""
    words = set(TOPICS) | set(NOUN_TOPIC) | set(POSITIVE) | set(NEGATIVE) | set(NEUTRAL)
    for template in TEMPLATES:
        words |= set(template.replace("{}", "").split())
    return sorted(words)


@dataclass(frozen=True)
class WordsExample:
    prompt: str
    topic: str
    response: str


def is_task_prompt(prompt: str) -> bool:
    """Whether the task made this prompt: its last word names a known topic."""
    words = prompt.split()
    return bool(words) and words[-1] in TOPICS


def topic_of(prompt: str) -> str:
    """The topic is the prompt's last word; raises on a prompt the task did not make."""
    if not is_task_prompt(prompt):
        raise ValueError(f"prompt {prompt!r} does not name a known topic ({', '.join(TOPICS)})")
    return prompt.split()[-1]


@functools.cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_score(prompt: str, response: str, *, target_len: int = 6) -> float:
    """The hidden gold rule (see the module docstring); higher is better, in [-2, 2]."""
    topic = topic_of(prompt)
    words = response.split()
    nouns = [w for w in words if w in NOUN_TOPIC]
    on_topic = sum(NOUN_TOPIC[w] == topic for w in nouns) / len(nouns) if nouns else 0.0
    tone = _analyzer().polarity_scores(response)["compound"] if words else -1.0
    length_penalty = min(1.0, abs(len(words) - target_len) / target_len)
    return on_topic + tone - length_penalty


def make_prompt(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(TOPICS))
    return rng.choice(TEMPLATES).format(topic), topic


def make_response(rng: random.Random, topic: str, quality: float, target_len: int = 6) -> str:
    """A demonstration whose on-topic, tone and length all improve with `quality` in [0, 1]."""
    spread = 1.0 + 5.0 * (1.0 - quality)
    length = max(2, min(14, round(rng.gauss(target_len, spread))))
    other = [n for t, nouns in TOPICS.items() if t != topic for n in nouns]
    words = []
    for _ in range(length):
        kind = rng.random()
        if kind < 0.4:
            words.append(rng.choice(TOPICS[topic]) if rng.random() < 0.3 + 0.7 * quality else rng.choice(other))
        elif kind < 0.7:
            words.append(rng.choice(POSITIVE) if rng.random() < quality else rng.choice(NEGATIVE))
        else:
            words.append(rng.choice(NEUTRAL))
    return " ".join(words)


def make_demonstrations(n: int, seed: int, *, target_len: int = 6) -> list[WordsExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, topic = make_prompt(rng)
        out.append(WordsExample(prompt, topic, make_response(rng, topic, rng.random(), target_len)))
    return out


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_prompt(rng)[0] for _ in range(n)]
