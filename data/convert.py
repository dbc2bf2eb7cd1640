"""Convert published reward benchmarks and preference sets into mrrm's JSONL schema.

mrrm's schema, one sample per line:
    prompt     str
    responses  list of str, two or more
    rankings   list of int, one per response, 1 = best, ties allowed (equal ints)
    image      optional: a path, or a list of paths
    video      optional: a path, a list of frame paths, or a folder
    category   optional str
    id         optional: the original record's id, kept as published
    pair       optional int: which pair of a shared id this is (MM-RLHF, for ACC+)

Run:
    python data/convert.py NAME IN OUT [--image-root DIR] [--skip-bad]
    python data/convert.py bench [--n 100000]     # regenerate the throughput figure

NAME is one of vlrewardbench, mmrewardbench, mmrlhf, videorewardbench, mr2bench, rlaifv,
vlfeedback. IN is JSONL or one JSON list. Images embedded as bytes ({"bytes": ...} dicts, base64
strings, data URLs) are decoded, turned upright by their EXIF orientation as transformers'
load_image does, and written as PNG into OUT's folder, under `<OUT stem>_images/`,
named by a hash of their bytes; samples reference them by a path relative to OUT's folder. Image
and video paths in IN are joined to --image-root (and checked to exist) when it is given, and
otherwise kept as published.

A malformed record is reported as `file:line: field: what is wrong`. By default the first one stops
the conversion and nothing is written (OUT and the images go to temporary names that are renamed
only at the end); --skip-bad skips such records, counts them and prints their messages.

Left out: downloading the benchmarks (each ships its own script), parquet input (export to JSONL
first; pyarrow is not a runtime dependency), video decoding, and any de-duplication.
"""

import argparse
import base64
import binascii
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# the schema lives in mrrm.py
from mrrm import OPTIONAL_FIELDS, is_int as _is_int, read_records, validate_sample  # noqa: E402


class BadRecord(ValueError):
    """A record that cannot become a valid sample; the message names file:line and the field."""


# ----------------------------------------------------------------------------- helpers

def _get(obj, key, where, kind=str):
    if not isinstance(obj, dict):
        raise BadRecord(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if key not in obj:
        raise BadRecord(f"{where}: {key}: missing")
    return _typed(obj[key], key, where, kind)


def _opt(obj, key, where, kind=(str, int)):
    """An optional field as published (None when absent or null), its type checked under its own name."""
    v = obj.get(key)
    return v if v is None else _typed(v, key, where, kind)


def _typed(v, key, where, kind):
    if not isinstance(v, kind) or isinstance(v, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRecord(f"{where}: {key}: expected {names}, found {type(v).__name__}")
    return v


def _optional(sample, **fields):
    """sample with the fields whose value is not None added (an id or category left unpublished)."""
    sample.update({k: v for k, v in fields.items() if v is not None})
    return sample


def dense_ranks(values, higher_is_better):
    """1 = best; equal values share a rank and the next value takes the next int (1, 1, 2)."""
    distinct = sorted(set(values), reverse=higher_is_better)
    rank_of = {v: i + 1 for i, v in enumerate(distinct)}
    return [rank_of[v] for v in values]


def _shown_order(key):
    """True for about half the keys: show the responses in reverse. Published pairs list the preferred
    response first, and a joint (multi-response) reward model would learn that position. A hash of
    the sample's key decides, so the output is the same on every run. Not zlib.crc32: CRC is linear
    in the key's bits, so keys differing only in a last digit ('q/0' .. 'q/3') all got one order."""
    return hashlib.sha256(key.encode()).digest()[0] & 1


def _chosen_rejected(chosen, rejected, key):
    if _shown_order(key):
        return [rejected, chosen], [2, 1]
    return [chosen, rejected], [1, 2]


# Base64 of the file signatures of PNG, JPEG, GIF, WebP, BMP and TIFF (little- and big-endian). A
# string starting with one of these and holding no '.' (outside base64's alphabet, inside nearly
# every file name) is an embedded image, not a path.
_B64_IMAGE_PREFIXES = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "Qk", "SUkqA", "TU0AK")


def _is_embedded(s):
    return s.startswith("data:") or (s.startswith(_B64_IMAGE_PREFIXES) and "." not in s)


class Context:
    """What a converter needs beyond its record: where images go, and a count per id (MM-RLHF)."""

    def __init__(self, out_path, image_root=None):
        out_path = Path(out_path)
        self.out_dir = out_path.parent
        self.images_name = f"{out_path.stem}_images"
        self.tmp_images = self.out_dir / f".{self.images_name}.tmp"
        shutil.rmtree(self.tmp_images, ignore_errors=True)  # a killed run's leftovers: not this run's images
        self.image_root = Path(image_root) if image_root else None
        self.pairs = Counter()

    def path(self, p, where, key):
        if not isinstance(p, str) or not p:
            raise BadRecord(f"{where}: {key}: expected a path, found {json.dumps(p)[:60]}")
        if self.image_root is None:
            return p
        full = self.image_root / p
        if not full.exists():
            raise BadRecord(f"{where}: {key}: no file at {full}")
        return os.path.relpath(full, self.out_dir)

    def image(self, value, where, key):
        if isinstance(value, list) and value:
            return [self.image(v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):  # the Hugging Face Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return self._write_png(value["bytes"], where, key)
            return self.path(value.get("path"), where, f"{key}.path")
        if isinstance(value, str) and _is_embedded(value):
            return self._write_png(value, where, key)
        return self.path(value, where, key)

    def video(self, value, where, key):
        if isinstance(value, list) and value:
            return [self.path(p, where, f"{key}[{i}]") for i, p in enumerate(value)]
        return self.path(value, where, key)

    def _write_png(self, raw, where, key):
        try:
            if isinstance(raw, list):  # bytes as a JSON list of ints
                data = bytes(raw)
            elif isinstance(raw, str):
                if raw.startswith("data:") and "," not in raw:
                    raise ValueError("a data URL with no ',' before its data")
                text = raw.split(",", 1)[1] if raw.startswith("data:") else raw
                # MIME-style base64 breaks its lines every 76 characters; whitespace is the only thing
                # dropped, so any other stray character is still reported instead of decoded around.
                data = base64.b64decode("".join(text.split()), validate=True)
            else:
                raise ValueError(f"expected base64 text or a list of ints, found {type(raw).__name__}")
            img = Image.open(io.BytesIO(data))
            img.load()
            # A camera stores the pixels as the sensor saw them plus an EXIF tag saying how to turn
            # them; transformers' load_image applies the tag, and the PNG keeps no EXIF, so turn the
            # pixels here or the model would see this image sideways.
            img = ImageOps.exif_transpose(img)
        except (ValueError, TypeError, binascii.Error, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadRecord(f"{where}: {key}: image bytes do not decode ({e})") from None
        name = hashlib.sha1(data).hexdigest()[:16] + ".png"
        self.tmp_images.mkdir(exist_ok=True)
        dest = self.tmp_images / name
        if not dest.exists():
            if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
                img = img.convert("RGB")  # e.g. CMYK JPEGs: PNG cannot hold them
            img.save(dest, "PNG")
        return f"{self.images_name}/{name}"

    def commit(self, tmp_out, out_path):
        """The new images folder, then OUT, into place. If a step fails, the old folder and the old OUT
        are left as they were (OUT never points at images that are not there)."""
        if not self.tmp_images.exists():
            os.replace(tmp_out, out_path)
            return
        final, old = self.out_dir / self.images_name, self.out_dir / f".{self.images_name}.old"
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            raise ValueError(f"{final}: exists and is not a folder; the embedded images are written there: move it away")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(self.tmp_images, final)
            try:
                os.replace(tmp_out, out_path)
            except BaseException:
                os.replace(final, self.tmp_images)  # abort() removes it
                raise
        except BaseException:
            if old.exists():
                os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def abort(self):
        shutil.rmtree(self.tmp_images, ignore_errors=True)


# ----------------------------------------------------------------------------- converters
# Each converter: (record, where, ctx) -> list of samples; raises BadRecord naming the field.

def vlrewardbench(obj, where, ctx):
    # Verified against the HF card MMInstruction/VL-RewardBench (README, 'Data Fields'): `id`,
    # `query`, `response` (list of two), `image` (HF Image: {"bytes", "path"}), `human_ranking`
    # ("[0, 1] denotes the first one is preferred; [1, 0] the second"), `models`, `query_source`.
    # `image_path` (vl-rewardbench/VL_RewardBench data/data.jsonl) is accepted too. query_source
    # becomes the category; in data.jsonl it names upstream sets (COCO, TextVQA, ...), and the
    # benchmark's own six datasets come from the id (mrrm.vlrewardbench_dataset), as eval reports them.
    responses = _get(obj, "response", where, list)
    ranking = _get(obj, "human_ranking", where, list)
    if len(ranking) != len(responses) or not all(_is_int(r) for r in ranking):
        raise BadRecord(f"{where}: human_ranking: expected {len(responses)} ints (one per response), found {ranking}")
    if "image" in obj and obj["image"] is not None:
        image = ctx.image(obj["image"], where, "image")
    else:
        image = ctx.image(_get(obj, "image_path", where), where, "image_path")
    rankings = dense_ranks(ranking, higher_is_better=False)
    # the published file lists the preferred response first in nearly every record (the benchmark's
    # own inference script shuffles them): reverse about half, keyed like rlaifv's swap
    query = _get(obj, "query", where)
    key = str(obj["id"]) if obj.get("id") is not None else query + "\n" + "\n".join(map(str, responses))
    if _shown_order(key):
        responses, rankings = responses[::-1], rankings[::-1]
    sample = {"prompt": query, "responses": responses, "rankings": rankings, "image": image}
    return [_optional(sample, category=_opt(obj, "query_source", where, str), id=_opt(obj, "id", where))]


def mmrewardbench(obj, where, ctx):
    # Verified against facebookresearch/multimodal_rewardbench (README and scripts/): data/all_data.json
    # is one JSON list of records with `ID`, `Text`, `Image` (a path relative to the data/ folder,
    # e.g. images/nocaps/13062.jpg), `Output1`, `Output2`, `Better` ("Output1" or "Output2"); the
    # accuracy script reads the category as ex['Meta']['Category'] where Meta is the record itself,
    # so `Category` is a top-level field (e.g. "open_generation/correctness_task"). A nested
    # `Meta.Category` is accepted as well.
    better = _get(obj, "Better", where)
    if better not in ("Output1", "Output2"):
        raise BadRecord(f"{where}: Better: expected 'Output1' or 'Output2', found {better!r}")
    category = _opt(obj, "Category", where, str)
    if category is None and isinstance(obj.get("Meta"), dict):
        category = obj["Meta"].get("Category")
    # scripts/2_get_accuracy.py reports safety and reasoning in two parts each, told apart by the ID
    # (lowercased): safety/bias for IDs starting 'pairs' (the PAIRS set), else safety/toxicity;
    # reasoning/math for IDs starting 'math', else reasoning/coding.
    sample_id = str(obj.get("ID") or "").lower()
    if category == "safety":
        category = "safety/bias" if sample_id.startswith("pairs") else "safety/toxicity"
    elif category == "reasoning":
        category = "reasoning/math" if sample_id.startswith("math") else "reasoning/coding"
    sample = {"prompt": _get(obj, "Text", where),
              "responses": [_get(obj, "Output1", where), _get(obj, "Output2", where)],
              "rankings": [1, 2] if better == "Output1" else [2, 1],
              "image": ctx.image(_get(obj, "Image", where, (str, dict, list)), where, "Image")}
    return [_optional(sample, category=category, id=_opt(obj, "ID", where))]


_MMRLHF_CATEGORIES = ("mcq", "long", "short", "safety", "video")


def mmrlhf(obj, where, ctx):
    # Verified against yfzhang114/r1_reward inference/MM-RLHF-Reward/ (mm_reward_bench.jsonl and
    # get_acc.py), the MM-RLHF authors' copy of MM-RLHF-RewardBench: JSONL with `id`, `image` (or
    # `video`), `prompt`, `chosen`, `rejected`, `chosen_reason`, `rejected_reason`. Several lines
    # share an id; ACC+ counts an id only when all its pairs are right, so `pair` numbers them.
    # The category is the first of mcq/long/short/safety/video found in the media path, as the
    # official accuracy script does.
    qid = _get(obj, "id", where, (str, int))
    chosen, rejected = _get(obj, "chosen", where), _get(obj, "rejected", where)
    sample = {"prompt": _get(obj, "prompt", where)}
    if obj.get("video"):
        sample["video"] = ctx.video(obj["video"], where, "video")
        published = obj["video"]
    else:
        sample["image"] = ctx.image(_get(obj, "image", where, (str, dict, list)), where, "image")
        published = obj["image"]
    pair = ctx.pairs[str(qid)]
    ctx.pairs[str(qid)] += 1
    sample["responses"], sample["rankings"] = _chosen_rejected(chosen, rejected, f"{qid}/{pair}")
    published = published if isinstance(published, str) else json.dumps(published)[:200]
    category = next((c for c in _MMRLHF_CATEGORIES if c in published), None)
    return [_optional(sample, category=category, id=qid, pair=pair)]


def passthrough(obj, where, ctx):
    # VideoRewardBench and MR2Bench come already N-way in mrrm's schema (the paper's release), so
    # they are only validated; media paths are mapped like every other converter's. `null` in an
    # optional field means absent, as mrrm.load_samples reads it, so such a field is dropped.
    if not isinstance(obj, dict):
        raise BadRecord(f"{where}: expected a JSON object, found {type(obj).__name__}")
    sample = {k: v for k, v in obj.items() if v is not None or k not in OPTIONAL_FIELDS}
    if "image" in sample:
        sample["image"] = ctx.image(sample["image"], where, "image")
    if "video" in sample:
        sample["video"] = ctx.video(sample["video"], where, "video")
    return [sample]


def rlaifv(obj, where, ctx):
    # Verified against the HF card openbmb/RLAIF-V-Dataset ('Data fields'): `ds_name`, `image`
    # ("Dict contains path and bytes"), `question`, `chosen`, `rejected`, `origin_dataset`,
    # `origin_split` (generator/labeler models and question type), `idx`, `image_path`.
    chosen, rejected = _get(obj, "chosen", where), _get(obj, "rejected", where)
    if obj.get("image") is not None:
        image = ctx.image(obj["image"], where, "image")
    else:
        image = ctx.image(_get(obj, "image_path", where), where, "image_path")
    # The swap is keyed on idx, or on the record's own text when it has none, so the same record
    # is shown the same way whatever file (or line) it is read from.
    question = _get(obj, "question", where)
    key = str(obj["idx"]) if obj.get("idx") is not None else f"{question}\n{chosen}\n{rejected}"
    responses, rankings = _chosen_rejected(chosen, rejected, key)
    sample = {"prompt": question, "responses": responses, "rankings": rankings, "image": image}
    return [_optional(sample, category=_opt(obj, "origin_dataset", where, str), id=_opt(obj, "idx", where))]


def _mean_rating(completion, where):
    annotations = _get(completion, "annotations", where, dict)
    ratings = []
    for aspect, note in annotations.items():
        rating = note.get("Rating") if isinstance(note, dict) else None
        try:
            value = float(rating)
        except (TypeError, ValueError):
            continue  # GPT-4V sometimes wrote "N/A": that aspect does not count
        if isinstance(rating, bool) or not math.isfinite(value):
            continue  # "nan" or "inf" parse as floats but rate nothing (a NaN would scramble the sort)
        ratings.append(value)
    if not ratings:
        raise BadRecord(f"{where}: annotations: no numeric Rating in any aspect ({', '.join(annotations) or 'none'})")
    return sum(ratings) / len(ratings)


def vlfeedback(obj, where, ctx):
    # Verified against the HF card MMInstruction/VLFeedback (dataset_info) and its loader script:
    # `id`, `prompt`, `models`, `completions` (list of {`annotations`: {"Helpfulness",
    # "Ethical Considerations", "Visual Faithfulness"}: {"Rating": str, "Rationale": str}},
    # `model`, `response`}), `img_path`; file vlfeedback_80k.jsonl, 4 completions per prompt.
    completions = _get(obj, "completions", where, list)
    if len(completions) < 2:
        raise BadRecord(f"{where}: completions: expected 2 or more, found {len(completions)}")
    responses, means = [], []
    for i, c in enumerate(completions):
        responses.append(_get(c, "response", f"{where}: completions[{i}]"))
        means.append(_mean_rating(c, f"{where}: completions[{i}]"))
    sample = {"prompt": _get(obj, "prompt", where), "responses": responses,
              "rankings": dense_ranks(means, higher_is_better=True),
              "image": ctx.image(_get(obj, "img_path", where, (str, dict)), where, "img_path")}
    return [_optional(sample, id=_opt(obj, "id", where))]


CONVERTERS = {
    "vlrewardbench": vlrewardbench,
    "mmrewardbench": mmrewardbench,
    "mmrlhf": mmrlhf,
    "videorewardbench": passthrough,
    "mr2bench": passthrough,
    "rlaifv": rlaifv,
    "vlfeedback": vlfeedback,
}


# ----------------------------------------------------------------------------- driver

def convert(name, in_path, out_path, image_root=None, skip_bad=False):
    """Convert IN into OUT; returns {records_in, samples_out, skipped, bad: [messages], seconds}.

    Raises BadRecord (or ValueError for malformed JSON) at the first bad record unless skip_bad;
    in that case neither OUT nor its images folder is touched.
    """
    fn = CONVERTERS[name]
    out_path = Path(out_path)
    if out_path.exists() and Path(in_path).exists() and os.path.samefile(in_path, out_path):
        raise ValueError(f"{out_path}: OUT is IN; converting in place would replace the published file")
    ctx = Context(out_path, image_root)
    bad_json, bad = [], []
    records_in = samples_out = 0
    t0 = time.perf_counter()
    # Not mkstemp: its file is 0600 and would stay so after the rename. open() creates the file
    # with the umask's usual permissions (0644 under umask 022), like the PNGs beside it.
    tmp = out_path.parent / f".{out_path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for line_no, obj in read_records(in_path, errors=bad_json if skip_bad else None):
                records_in += 1
                where = f"{in_path}:{line_no}"
                try:
                    samples = fn(obj, where, ctx)
                    if problems := [p for s in samples for p in validate_sample(s, where)]:
                        raise BadRecord("; ".join(problems))
                    # serialised here so that text UTF-8 cannot hold (a lone surrogate) is this record's problem
                    lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
                    try:
                        lines.isascii() or lines.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise BadRecord(f"{where}: text that is not valid Unicode ({e.reason})") from None
                except BadRecord as e:
                    if not skip_bad:
                        raise
                    bad.append(str(e))
                    continue
                out.write(lines)
                samples_out += len(samples)
        if not samples_out:  # an empty IN, or every record bad: an earlier OUT is worth more than nothing
            raise ValueError(f"{in_path}: no sample converted ({records_in + len(bad_json)} records read, "
                             f"{len(bad_json) + len(bad)} bad)")
        ctx.commit(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        ctx.abort()
        raise
    return {"records_in": records_in + len(bad_json), "samples_out": samples_out, "skipped": len(bad_json) + len(bad),
            "bad": bad_json + bad, "seconds": time.perf_counter() - t0}


def _synthetic_line(name, i):
    if name == "rlaifv":
        return {"ds_name": "RLAIF-V", "image_path": f"img/{i}.jpg", "question": f"What is shown in picture {i}?",
                "chosen": "A cat sitting on a red mat. " * 8, "rejected": "A dog lying on a blue mat. " * 8,
                "origin_dataset": "OK-VQA", "origin_split": "{}", "idx": f"OK-VQA_{i}"}
    return {"id": f"RLAIF-V-{i}", "query": f"Describe image {i} in detail.",
            "response": ["A cat sitting on a red mat. " * 8, "A dog lying on a blue mat. " * 8],
            "image_path": f"img/{i}.jpg", "human_ranking": [i % 2, 1 - i % 2], "query_source": "RLAIF-V"}


def bench(n=100_000, names=("rlaifv", "vlrewardbench")):
    """Records/s of each converter on an n-record synthetic JSONL file (paths, no image bytes)."""
    rates = {}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            src = Path(d) / f"{name}.jsonl"
            with open(src, "w") as f:
                f.writelines(json.dumps(_synthetic_line(name, i)) + "\n" for i in range(n))
            stats = convert(name, src, Path(d) / f"{name}.out.jsonl")
            rates[name] = stats["records_in"] / stats["seconds"]
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="name", required=True)
    for name in CONVERTERS:
        p = sub.add_parser(name, help=f"convert {name} into mrrm JSONL")
        p.add_argument("inp", metavar="IN", help="the benchmark as published: JSONL or one JSON list")
        p.add_argument("out", metavar="OUT", help="mrrm JSONL to write; embedded images go beside it")
        p.add_argument("--image-root", default=None, help="folder the published image/video paths are relative to")
        p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    p = sub.add_parser("bench", help="records/s on a synthetic file (no images)")
    p.add_argument("--n", type=int, default=100_000, help="records in the synthetic file")
    args = parser.parse_args(argv)

    if args.name == "bench":
        for name, rate in bench(args.n).items():
            print(f"bench {name} | records {args.n} | records_per_s {rate:,.0f}")
        return 0
    try:
        stats = convert(args.name, args.inp, args.out, args.image_root, args.skip_bad)
    except (BadRecord, ValueError, OSError) as e:
        print(f"error: {e}\nnothing was written to {args.out}", file=sys.stderr)
        return 1
    for msg in stats["bad"][:20]:
        print(f"skipped: {msg}", file=sys.stderr)
    if len(stats["bad"]) > 20:
        print(f"skipped: ... and {len(stats['bad']) - 20} more", file=sys.stderr)
    rate = stats["records_in"] / max(stats["seconds"], 1e-9)
    print(f"{args.name} | records_in {stats['records_in']} | samples_out {stats['samples_out']} | "
          f"skipped {stats['skipped']} | seconds {stats['seconds']:.2f} | records_per_s {rate:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
