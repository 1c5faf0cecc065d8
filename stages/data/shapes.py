"""The embedded visual task (`data=embedded_vision`): name the colour of a shape in a small image.

Each prompt is a 16x16 picture, drawn here with PIL (a square, circle or triangle of one of six
colours at a random place and size on a light, slightly varying background), and a question ("what
colour is the shape"). A response ends in a colour ("it is red"). The gold rule reads the image
itself: the colour of the pixels that stand out from the background, matched to the nearest colour
of the palette, must be the response's last colour word (1.0, else 0.0). It is exact match, so its
mean is an accuracy with a Wilson interval, and it needs no labeler or reward model of its own.

The question is the same text for every image, so nothing but the pixels says the answer: a policy
that beats chance has learned to see. Demonstrations are noisy on purpose (a share `DEMO_ACCURACY`
right, the rest another colour), so SFT imitates a mostly wrong distribution and leaves headroom
for PPO and DPO. Everything is deterministic in the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stages.data.images import IMAGE_TOKEN, images_of, open_image, to_png_uri

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (225, 205, 30),
    "purple": (135, 50, 175),
    "orange": (235, 130, 25),
}
SHAPES = ("square", "circle", "triangle")
TEMPLATES = ("what colour is the shape", "what colour is this", "name the colour", "which colour do you see")
ANSWER = "it is {}"
DEMO_ACCURACY = 0.35
SIZE = 16


@dataclass(frozen=True)
class ShapesExample:
    prompt: list[dict]
    colour: str
    response: str


def vocabulary() -> list[str]:
    words = set(COLOURS) | set(SHAPES)
    for template in (*TEMPLATES, ANSWER, *CAPTIONS):
        words |= set(template.replace("{}", "").replace("{0}", "").replace("{1}", "").split())
    return sorted(words)


def draw(rng: random.Random, colour: str, shape: str):
    """A 16x16 RGB picture of one shape."""
    from PIL import Image, ImageDraw

    grey = rng.randint(225, 255)
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    side = rng.randint(7, 12)
    x, y = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    box = (x, y, x + side - 1, y + side - 1)
    if shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "circle":
        pen.ellipse(box, fill=fill)
    else:
        pen.polygon([(x, y + side - 1), (x + side - 1, y + side - 1), (x + (side - 1) // 2, y)], fill=fill)
    return image


def colour_in(image) -> str:
    """The palette colour of the pixels that stand out from the background (saturated ones)."""
    pixels = [p for p in image.getdata() if max(p) - min(p) > 60]
    if not pixels:
        raise ValueError("the image has no coloured pixels")
    mean = [sum(p[c] for p in pixels) / len(pixels) for c in range(3)]
    return min(COLOURS, key=lambda name: sum((m - c) ** 2 for m, c in zip(mean, COLOURS[name])))


def prompt(rng: random.Random) -> tuple[list[dict], str]:
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    uri = to_png_uri(draw(rng, colour, shape))
    return [{"role": "user", "content": f"{IMAGE_TOKEN} {rng.choice(TEMPLATES)}", "images": [uri]}], colour


def final_colour(response: str) -> str | None:
    words = [w for w in response.split() if w in COLOURS]
    return words[-1] if words else None


def exact_match(prompt: list[dict], response: str) -> float:
    """The gold rule: 1.0 when the response's last colour word is the image's colour."""
    images = images_of(prompt)
    if len(images) != 1:
        raise ValueError("a prompt of the visual task has exactly one image")
    return float(final_colour(response) == colour_in(open_image(images[0])))


def make_demonstrations(n: int, seed: int) -> list[ShapesExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, colour = prompt(rng)
        said = colour if rng.random() < DEMO_ACCURACY else rng.choice([c for c in COLOURS if c != colour])
        out.append(ShapesExample(p, colour, ANSWER.format(said)))
    return out


def make_prompts(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [prompt(rng)[0] for _ in range(n)]


CAPTIONS = ("a {} {}", "the {1} is {0}", "{0} {1}", "a picture of a {} {}")


def captions(n: int, seed: int) -> list[dict]:
    """Captioned pictures for the base's pretraining, as a VLM's base is pretrained on image-text
    pairs (LLaVA's first stage): `{"image": data URI, "text": "a red circle"}`. The base learns to see
    and to name colours; SFT then teaches the question-and-answer form, from noisy demonstrations."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        out.append({"image": to_png_uri(draw(rng, colour, shape)), "text": rng.choice(CAPTIONS).format(colour, shape)})
    return out
