"""Shape-world: synthetic images, questions with exact answers and 4 ranked responses each.

mrrm's embedded default demo. A scene is 1 to 4 coloured shapes on a 3x3 grid; a question about it
(colour, count, position or describe) has one exact answer; four responses sit on a quality ladder
that a tiny reward model must learn to rank by looking at the image. `is_correct` is the exact-answer
checker a GRPO run scores its policy with, and `caption`/`qa_pairs` feed backbone pretraining.

    >>> import random
    >>> rng = random.Random(0)
    >>> sample = make_sample(rng)
    >>> sample["image"].size, sorted(sample["record"]["rankings"])
    ((48, 48), [1, 2, 3, 4])
    >>> best = sample["record"]["responses"][sample["record"]["rankings"].index(1)]
    >>> is_correct(sample["record"], best)
    True

Run (about 5 s for 11,000 samples; same seed, byte-identical files):
    python data/shapeworld.py --out data/shapeworld --train 10000 --heldout 1000 --seed 0
writes OUT/train.jsonl, OUT/heldout.jsonl and OUT/images/{id}.png. A record's id hashes its scene and
what is asked (not the wording). The held-out split is written first, the first distinct samples of
its own stream, every question type equally often; train then skips its (image, question) pairs and
asks position questions twice as often as each other type (--train-mix position=2: the hardest type,
the one a reward model learns last, is 2/5 of train; --train-mix '' for uniform).

The ladder (rank 1 = best), built from the exact answer A and two wrong answers:
    1  A, said plainly.
    2  hedged and vague: names A together with its near miss B ("red or orange", "3 or 4", "somewhere
       in the top row", a describe that leaves B's changed colour out). It never commits to A, so
       `is_correct` says False: it ranks above 3 for being true, not for being an exact answer.
    3  the near miss B, said plainly: the neighbouring hue on the ring red-orange-yellow-green-blue-
       purple; another cell in the same row or column; the count off by one; describe with one
       colour swapped for its neighbour.
    4  a far miss C, said plainly: close to neither A nor B (two+ hues away; no shared row or column;
       off by two or more); describe lists as many shapes, all in cells where there is none. In a
       quarter of the colour, count and position samples instead: an off-topic answer, true of the
       scene but about something else ("I count one green circle." to "Where is the green
       circle?"; see make_sample).
Why it is built so: the rank must need the image. Ranks 1, 3, 4 draw from one template list; A is
balanced (make_sample picks the answer uniformly, then draws scenes until one has it); B is drawn so
that (A, B) is exchangeable, hence every answer is as frequent at rank 3 as at rank 1: a count's
near miss is its partner in {1,2},{3,4} (or {0,1},{2,3}), since "one more or one less" would make
the ends rarer as B than as A. So no text-only model tells rank 1 from rank 3. It can spot rank 4:
by its relation to the others (C is close to nothing), and for counts also alone, as a count set of
four leaves C no value but an end of it ("1"/"4", "0"/"3"). Hence a text-only pick of rank 1 among
1/3/4 can reach 1/2, a limit that comes with any ladder where a near miss is nearer than a far one.

Left out: overlapping or jittered shapes, more colours, sizes in questions, relations ("left of"),
multi-turn dialogue, any image noise or augmentation.
"""

import argparse
import hashlib
import itertools
import json
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

# Insertion order is the hue ring: neighbours on it are rank 3's "confusable" colour.
COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 210, 30),
          "green": (40, 160, 60), "blue": (40, 90, 220), "purple": (140, 60, 180)}
COLOR_RING = tuple(COLORS)
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELLS = tuple((r, c) for r in range(3) for c in range(3))
BACKGROUND = (240, 240, 240)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

QTYPES = ("color", "count", "position", "describe")
# A variant fixes the set an exact answer comes from; the count variants differ in that set.
VARIANTS = {"color": ("color",), "count": ("total", "color_count", "kind_count"),
            "position": ("position",), "describe": ("describe",)}
QTYPE_OF = {v: q for q, vs in VARIANTS.items() for v in vs}
# Even-sized count sets so that every count has an off-by-one partner (see near_miss).
ANSWER_SPACE = {"color": COLOR_RING, "position": CELLS, "total": (1, 2, 3, 4),
                "color_count": (0, 1, 2, 3), "kind_count": (0, 1, 2, 3)}

ASK = {
    "color": ("What color is the {subject}?", "Which color is the {subject}?",
              "What is the color of the {subject}?", "Tell me the color of the {subject}."),
    "count": ("How many {subject} are there?", "Count the {subject}.",
              "How many {subject} can you see?", "What is the number of {subject}?"),
    "position": ("Where is the {subject}?", "Where can you find the {subject}?",
                 "In which part of the image is the {subject}?", "What is the position of the {subject}?"),
    "describe": ("Describe the image.", "What do you see in the image?",
                 "List all the shapes in the image.", "Describe every shape in the picture."),
}
# Ranks 1, 3 and 4 all draw from SAY: only the answer differs, never the wording.
SAY = {
    "color": ("The {subject} is {answer}.", "It is {answer}.", "{answer}.",
              "The color of the {subject} is {answer}.", "The {subject} in the image is {answer}."),
    "count": ("There {be} {answer} {things}.", "I count {answer} {things}.", "{answer}.",
              "The image has {answer} {things}."),
    "position": ("The {subject} is at the {answer}.", "It is at the {answer}.", "{answer}.",
                 "You can find the {subject} at the {answer}.",
                 "The {subject} is in the {answer} part of the image."),
    # The first is the caption: digits only, so that caption(scene) is one fixed string.
    "describe": ("There {be} {n} {noun}: {items}.", "I see {items}.", "The image shows {items}.",
                 "{items}."),
}
HEDGE = {
    "color": ("It is either {a} or {b}, I am not sure.", "The {subject} looks {a}, or maybe {b}.",
              "Hard to say: {a} or {b}."),
    "count": ("Maybe {a} or {b} {subject}, I am not sure.", "I think there are {a} or {b} {subject}.",
              "Roughly {a} or {b}."),
    "position": ("I think the {subject} is somewhere in the {line}.", "Somewhere in the {line}, I believe.",
                 "It is probably in the {line}."),
    "describe": ("I think I see {items}, but I am not sure.", "Probably {items}.",
                 "It is hard to tell, but maybe {items}."),
}


@dataclass(frozen=True, order=True)
class Shape:
    kind: str
    color: str
    size: str
    row: int  # 0..2 = top, middle, bottom
    col: int  # 0..2 = left, center, right


@dataclass
class Scene:
    shapes: list  # of Shape, in row-major cell order, at most one per cell


@dataclass
class Question:
    qtype: str
    text: str
    answer: str  # canonical exact answer: "red", "3", "top left", or caption(scene)
    subject: str = ""  # what is asked about: "triangle", "red shapes", "blue circle", ""
    variant: str = ""  # which ANSWER_SPACE the answer comes from


# ----------------------------------------------------------------------------- scenes and pixels

def random_shape(rng, cell):
    return Shape(rng.choice(KINDS), rng.choice(COLOR_RING), rng.choice(SIZES), *CELLS[cell])


def make_scene(rng):
    cells = sorted(rng.sample(range(9), rng.randint(1, 4)))
    return Scene([random_shape(rng, cell) for cell in cells])


def render(scene, size=48):
    """Draw the scene, each shape centred in its grid cell; no anti-aliasing, so pixels are exact."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for s in scene.shapes:
        cx, cy = (s.col + 0.5) * cell, (s.row + 0.5) * cell
        # Under half a cell, so shapes never touch; small is still 8 px wide at 48 px (one 8 px patch).
        r = cell * (0.42 if s.size == "large" else 0.26)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.kind == "square":
            draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return image


# ----------------------------------------------------------------------------- text

def _cap(text):
    return text[0].upper() + text[1:]


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def position_phrase(cell):
    return f"{ROWS[cell[0]]} {COLS[cell[1]]}"


def shape_phrase(s, with_color=True):
    color = f"{s.color} " if with_color else ""
    return f"a {s.size} {color}{s.kind} at the {position_phrase((s.row, s.col))}"


def describe(shapes, template, blank=None):
    """`template` filled with the shapes; the shape at index `blank` is named without its colour."""
    n = len(shapes)
    items = _join([shape_phrase(s, i != blank) for i, s in enumerate(shapes)])
    return _cap(template.format(n=n, be="is" if n == 1 else "are", noun="shape" if n == 1 else "shapes",
                                items=items))


def caption(scene):
    """The canonical full description, also the exact answer of every describe question."""
    return describe(scene.shapes, SAY["describe"][0])


def say(variant, subject, value, rng):
    """One plain answer sentence, as rank 1, 3 or 4 writes it."""
    qtype = QTYPE_OF[variant]
    template = rng.choice(SAY[qtype])
    if qtype == "describe":
        return describe(value, template)
    if qtype == "count":
        things = subject[:-1] if value == 1 else subject  # "shapes" -> "shape"
        answer = rng.choice((str(value), NUMBER_WORDS[value]))
        return _cap(template.format(answer=answer, things=things, be="is" if value == 1 else "are"))
    answer = position_phrase(value) if qtype == "position" else value
    return _cap(template.format(answer=answer, subject=subject))


def hedge(variant, subject, truth, near, rng):
    """Rank 2: true but vague, consistent with both the truth and its near miss (see module doc)."""
    qtype = QTYPE_OF[variant]
    template = rng.choice(HEDGE[qtype])
    if qtype == "describe":
        blank = next(i for i, (s, t) in enumerate(zip(truth, near)) if s != t)
        return describe(truth, template, blank)
    if qtype == "position":
        line = f"{ROWS[truth[0]]} row" if truth[0] == near[0] else f"{COLS[truth[1]]} column"
        return _cap(template.format(subject=subject, line=line))
    a, b = rng.sample([truth, near], 2)
    if qtype == "count":
        a, b = rng.choice(((str(a), str(b)), (NUMBER_WORDS[a], NUMBER_WORDS[b])))
    return _cap(template.format(a=a, b=b, subject=subject))


# ----------------------------------------------------------------------------- questions

def askable(scene):
    """Every (variant, subject, exact value) this scene answers; colour/position only if unambiguous."""
    shapes = scene.shapes
    kinds, colors = Counter(s.kind for s in shapes), Counter(s.color for s in shapes)
    pairs = Counter((s.color, s.kind) for s in shapes)
    out = [("describe", "", tuple(shapes)), ("total", "shapes", len(shapes))]
    out += [("color", s.kind, s.color) for s in shapes if kinds[s.kind] == 1]
    out += [("position", f"{s.color} {s.kind}", (s.row, s.col)) for s in shapes if pairs[s.color, s.kind] == 1]
    out += [("color_count", f"{c} shapes", colors[c]) for c in COLOR_RING if colors[c] <= 3]
    out += [("kind_count", f"{k}s", kinds[k]) for k in KINDS if kinds[k] <= 3]
    return out


def _question(asked, rng):
    variant, subject, value = asked
    qtype = QTYPE_OF[variant]
    if qtype == "describe":
        answer = caption(Scene(list(value)))
    else:
        answer = position_phrase(value) if qtype == "position" else str(value)
    return Question(qtype, rng.choice(ASK[qtype]).format(subject=subject), answer, subject, variant)


def make_question(scene, rng):
    """A random question about `scene`: question type uniform among those the scene can answer."""
    by_qtype = {}
    for asked in askable(scene):
        by_qtype.setdefault(QTYPE_OF[asked[0]], []).append(asked)
    return _question(rng.choice(by_qtype[rng.choice(sorted(by_qtype))]), rng)


def qa_pairs(scene, rng):
    """(question, short correct answer sentence) for everything askable: pretraining text."""
    return [(_question(asked, rng).text, say(*asked, rng)) for asked in askable(scene)]


def balanced_question(rng, mix=None):
    """(scene, question) whose exact answer is uniform over its ANSWER_SPACE (see module doc).

    The question type is uniform, or drawn with the weights of `mix` ({qtype: weight}, missing = 1).
    The redrawing favours scenes that answer more: about 1/3 of the scenes have 4 shapes, 1/6 one.
    """
    qtype = rng.choices(QTYPES, [mix.get(q, 1.0) for q in QTYPES])[0] if mix else rng.choice(QTYPES)
    variant = rng.choice(VARIANTS[qtype])
    target = rng.choice(ANSWER_SPACE[variant]) if variant != "describe" else None
    # Redraw the scene, never the target, or rare answers (4 shapes, 3 of one colour) would stay rare.
    while True:
        scene = make_scene(rng)
        fits = [a for a in askable(scene) if a[0] == variant and target in (None, a[2])]
        if fits:
            return scene, _question(rng.choice(fits), rng)


# ----------------------------------------------------------------------------- the ladder

def _close(variant, u, v):
    if variant == "color":
        d = abs(COLOR_RING.index(u) - COLOR_RING.index(v))
        return min(d, len(COLOR_RING) - d) <= 1
    if variant == "position":
        return u[0] == v[0] or u[1] == v[1]
    return abs(u - v) <= 1


def near_miss(variant, value, rng):
    """Rank 3's wrong answer: symmetric, so (truth, near miss) is as likely as (near miss, truth)."""
    space = ANSWER_SPACE[variant]
    if QTYPE_OF[variant] == "count":
        return space[space.index(value) ^ 1]  # partners {1,2},{3,4} or {0,1},{2,3}
    if variant == "position":
        return rng.choice([v for v in space if (v[0] == value[0]) != (v[1] == value[1])])
    return rng.choice([v for v in space if v != value and _close(variant, value, v)])


def far_miss(variant, truth, near, rng):
    """Rank 4's wrong answer: close to neither, so it says nothing about which of the two is true."""
    return rng.choice([v for v in ANSWER_SPACE[variant]
                       if not _close(variant, truth, v) and not _close(variant, near, v)])


def make_responses(scene, question, rng):
    """[(text, rank)] for ranks 1..4, in rank order; `question` comes from make_question or make_sample."""
    variant, subject = question.variant, question.subject
    if variant == "describe":
        truth = list(scene.shapes)
        k = rng.randrange(len(truth))
        near = truth[:k] + [replace(truth[k], color=near_miss("color", truth[k].color, rng))] + truth[k + 1:]
        # As many shapes as the truth, each in an empty cell: every one of them is wrong.
        empty = [i for i, cell in enumerate(CELLS) if cell not in {(s.row, s.col) for s in truth}]
        far = [random_shape(rng, cell) for cell in sorted(rng.sample(empty, len(truth)))]
    else:
        truth = parse_answer(question.qtype, question.answer)
        near = near_miss(variant, truth, rng)
        far = far_miss(variant, truth, near, rng)
    return [(say(variant, subject, truth, rng), 1), (hedge(variant, subject, truth, near, rng), 2),
            (say(variant, subject, near, rng), 3), (say(variant, subject, far, rng), 4)]


def sample_id(scene, question):
    """A hash of the scene and what is asked (not the wording): equal ids = the same (image, question)."""
    key = json.dumps([asdict(scene), question.variant, question.subject])
    return "sw-" + hashlib.sha1(key.encode()).hexdigest()[:12]


def off_topic(scene, question, rng):
    """A true sentence about the scene that answers another question (a count for a position
    question, ...) and states no answer to this one, or None if the scene offers none. Never for or
    from describe: a sentence about one shape is part of a description, not off its topic."""
    if question.qtype == "describe":
        return None
    texts = [say(*asked, rng) for asked in askable(scene) if QTYPE_OF[asked[0]] not in (question.qtype, "describe")]
    texts = [t for t in texts if parse_answer(question.qtype, t) is None]
    return rng.choice(texts) if texts else None


def make_sample(rng, image_size=48, off_topic_rate=0.25, mix=None):
    """{"image": PIL image, "record": one line of mrrm's JSONL schema (responses in random order)}.
    In off_topic_rate of the samples rank 4 is an off-topic answer instead of a far miss (a reward
    model that never saw one rates "I count one green circle." highly as the answer to "Where is the
    green circle?", and a GRPO policy finds that out). Its draws come from a stream of their own, so
    the rest of every sample is the same at any rate. `mix` weights the question types."""
    scene, question = balanced_question(rng, mix)
    responses = make_responses(scene, question, rng)
    sid = sample_id(scene, question)
    side = random.Random(sid)
    if side.random() < off_topic_rate and (text := off_topic(scene, question, side)) is not None:
        responses[3] = (text, 4)
    rng.shuffle(responses)
    record = {"id": sid, "image": f"images/{sid}.png", "prompt": question.text,
              "responses": [text for text, _ in responses], "rankings": [rank for _, rank in responses],
              "category": question.qtype, "answer": question.answer, "subject": question.subject,
              "scene": asdict(scene)}
    return {"image": render(scene, image_size), "record": record}


# ----------------------------------------------------------------------------- checking answers

_WORD = re.compile(r"[a-z0-9]+")
_SPELLING = {"centre": "center", "colour": "color"}


def _words(text):
    return [_SPELLING.get(w, w) for w in _WORD.findall(text.lower())]


def _one(found):
    return next(iter(found)) if len(set(found)) == 1 else None


def _parse_shapes(text):
    """Shapes from clauses split at punctuation and "and"; each kind word needs exactly one size,
    colour, row and column word in its clause. Clauses without a kind ("There are 2 shapes") are skipped."""
    shapes = []
    for clause in re.split(r"[,;:.!?]|\band\b", text.lower()):
        words = _words(clause)
        kind = [w for w in words if w in KINDS]
        if not kind:
            continue
        fields = (kind, [w for w in words if w in COLORS], [w for w in words if w in SIZES],
                  [ROWS.index(w) for w in words if w in ROWS], [COLS.index(w) for w in words if w in COLS])
        values = [_one(f) for f in fields]
        if None in values:
            return None
        shapes.append(Shape(*values))
    return tuple(sorted(shapes)) or None


def parse_answer(qtype, text):
    """The one exact answer `text` states, or None when it states none or two different ones."""
    if qtype == "describe":
        return _parse_shapes(text)
    words = _words(text)
    if qtype == "color":
        return _one([w for w in words if w in COLORS])
    if qtype == "count":
        return _one([int(w) if w.isdigit() else NUMBER_WORDS.index(w)
                     for w in words if w.isdigit() or w in NUMBER_WORDS])
    if qtype == "position":
        row, col = _one([w for w in words if w in ROWS]), _one([w for w in words if w in COLS])
        return None if row is None or col is None else (ROWS.index(row), COLS.index(col))
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def is_correct(question, response):
    """Does `response` state exactly the ground-truth answer? `question` is a Question or a record."""
    if isinstance(question, dict):
        qtype, answer = question["category"], question["answer"]
    else:
        qtype, answer = question.qtype, question.answer
    truth = parse_answer(qtype, answer)
    if truth is None:
        raise ValueError(f"ground truth {answer!r} is not one exact {qtype} answer")
    return parse_answer(qtype, response) == truth


# ----------------------------------------------------------------------------- files

def stream(name, seed, image_size=48, exclude=(), mix=None, space="shapeworld"):
    """Distinct samples, without end, from the stream seeded by (space, name, seed), skipping ids in
    `exclude`. write_split saves the first n; the backbone's pretraining leaves the held-out stream's
    first samples out, and grpo.py scores its policy on them (and draws its prompts from space "grpo")."""
    rng = random.Random(f"{space}:{name}:{seed}")
    seen = set(exclude)
    while True:
        sample = make_sample(rng, image_size, mix=mix)
        if sample["record"]["id"] not in seen:
            seen.add(sample["record"]["id"])
            yield sample


def heldout_samples(n, seed, image_size=48):
    """The held-out split's first n samples, without files: what the backbone's pretraining leaves
    out and what grpo.py scores its policy on."""
    return list(itertools.islice(stream("heldout", seed, image_size), n))


def write_split(folder, name, n, seed, image_size=48, exclude=(), mix=None):
    """Write n samples to folder/{name}.jsonl and folder/images/; return their ids.

    The stream is seeded by (name, seed), so train and held-out differ even for one --seed; ids
    already written or in `exclude` are skipped, so no (image, question) pair repeats or leaks.
    `mix` weights the question types ({qtype: weight}; None: uniform).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ids = []
    with open(folder / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for sample in itertools.islice(stream(name, seed, image_size, exclude, mix), n):
            record = sample["record"]
            ids.append(record["id"])
            sample["image"].save(folder / record["image"])
            f.write(json.dumps(record) + "\n")
    return ids


def parse_mix(text):
    """'position=2' -> {"position": 2.0}: question-type weights, the types not named weigh 1."""
    mix = {}
    for part in filter(None, text.split(",")):
        qtype, _, weight = part.partition("=")
        qtype = qtype.strip()
        if qtype not in QTYPES:
            raise ValueError(f"--train-mix {text!r}: unknown question type {qtype!r}; expected one of {QTYPES}")
        try:
            mix[qtype] = float(weight)
        except ValueError:
            raise ValueError(f"--train-mix {text!r}: {part!r} is not TYPE=WEIGHT with a number") from None
        if not mix[qtype] >= 0:
            raise ValueError(f"--train-mix {text!r}: a weight must be 0 or more")
    if mix and sum(mix.get(q, 1.0) for q in QTYPES) == 0:
        raise ValueError(f"--train-mix {text!r}: every question type weighs 0")
    return mix or None


def build_parser():
    parser = argparse.ArgumentParser(description="Write the shape-world train and held-out splits.")
    parser.add_argument("--out", default="data/shapeworld", help="output folder")
    parser.add_argument("--train", type=int, default=10000, help="number of training samples")
    parser.add_argument("--heldout", type=int, default=1000, help="number of held-out samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of both splits (each mixes in its name)")
    parser.add_argument("--train-mix", default="position=2",
                        help="question-type weights of the train split, TYPE=WEIGHT,... (others weigh 1; '' for "
                             "uniform). Position, the hardest type, is 2/5 of it by default; held-out stays uniform")
    parser.add_argument("--image-size", type=int, default=48,
                        help="image side in pixels (48: a 16 px cell is 2x2 patches of 8 px, one merged token)")
    return parser


SPLIT_VERSION = 2  # 2: held-out written first, train mixed by --train-mix


def split_settings(args):
    """What split.json records: the settings a folder was written with."""
    return {"version": SPLIT_VERSION, **{k: v for k, v in vars(args).items() if k != "out"}}


def is_default_split(folder):
    """Was `folder` written by this version of the script with its default settings?"""
    try:
        with open(Path(folder) / "split.json", encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    return recorded == split_settings(build_parser().parse_args([]))


def main(argv=None):
    args = build_parser().parse_args(argv)
    mix = parse_mix(args.train_mix)
    start = time.perf_counter()
    # split.json vouches for the folder: it goes first and comes back last, so a run cut short
    # (Ctrl-C, a full disk) leaves a folder that mrrm regenerates, never a truncated split it trusts.
    settings = Path(args.out) / "split.json"
    settings.unlink(missing_ok=True)
    # Held-out first, from its own stream alone, so it stays the same whatever the train split is.
    heldout = write_split(args.out, "heldout", args.heldout, args.seed, args.image_size)
    train = write_split(args.out, "train", args.train, args.seed, args.image_size, exclude=heldout, mix=mix)
    partial = settings.with_suffix(".json.tmp")
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(split_settings(args), f, indent=1)
    partial.replace(settings)
    print(f"train {len(train)} | heldout {len(heldout)} | out {args.out} | "
          f"seconds {time.perf_counter() - start:.2f}")


if __name__ == "__main__":
    main()
