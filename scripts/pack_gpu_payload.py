"""Pack what the GPU machine needs for ``dermcir cv --profile gpu`` into ``gpu_payload/`` (git-ignored, ≤ 64 MiB).

The device machine gets only the checkout plus carried paths, has no PyPI weight packages and cannot see
``../shared``. So this packs:

* ``release/``: a Derm7pt-layout release of the cases: ``meta/meta.csv`` (the original rows) and the images already
  border-cropped and resized to 512×512, as WebP. Derived images stay research-only: never commit this folder.
* ``lite0_fp16.safetensors``: the ImageNet EfficientNet-Lite0 weights in timm's key names, fp16 (half the size).
* ``minilm/``: all-MiniLM-L6-v2 in fp16 with its vocabulary trimmed to the WordPiece tokens the texts use (plus the
  special tokens). WordPiece is greedy longest-match-first, so a word tokenises to the same pieces with any
  sub-vocabulary that contains the pieces it used; the embedding rows are re-indexed accordingly.

Usage: python scripts/pack_gpu_payload.py --data ../shared/derm7pt/release_v0 [--out gpu_payload] [--quality 82]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file


def pack_images(data: Path, out: Path, quality: int) -> list:
    from dermcir.data import load_derm7pt
    from dermcir.data.cache import preprocess_cases

    cases, report = load_derm7pt(data)
    cases, images = preprocess_cases(cases, 512, report=report)
    by_id = {c.case_id: i for i, c in enumerate(cases)}
    with open(data / "meta" / "meta.csv", newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        # the row each kept case came from, in the release's order: where a case number repeats, the loader keeps
        # the first usable row, so the row whose image is the case's (the loader's own path for it)
        rows, seen = [], set()
        for row in reader:
            case_id = row["case_num"].strip()  # as the loader reads it
            if (case_id in by_id and case_id not in seen
                    and data / "images" / row["derm"].strip() == cases[by_id[case_id]].image):
                seen.add(case_id)
                rows.append(row)
    if len(rows) != len(cases):  # a case whose row was not found would be lost from the payload without a word
        raise ValueError(f"{data}: found the rows of {len(rows)} of the {len(cases)} cases kept")
    (out / "meta").mkdir(parents=True, exist_ok=True)
    (out / "images" / "packed").mkdir(parents=True, exist_ok=True)
    for row in rows:
        case_id = row["case_num"].strip()
        name = f"packed/{case_id}.webp"
        Image.fromarray(images[by_id[case_id]]).save(out / "images" / name, quality=quality, method=6)
        row["derm"] = name
    with open(out / "meta" / "meta.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return cases


def pack_lite0(out: Path) -> None:
    from dermcir.models import create_backbone

    body = create_backbone("lite0").body
    save_file({k: v.half().contiguous() for k, v in body.state_dict().items() if v.is_floating_point()}
              | {k: v for k, v in body.state_dict().items() if not v.is_floating_point()},
              str(out / "lite0_fp16.safetensors"))


def pack_minilm(texts: list[str], out: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from dermcir.models.text_encoders import minilm_folder

    src = minilm_folder()
    tok = AutoTokenizer.from_pretrained(src)
    used = set(tok.all_special_ids)
    for ids in tok(texts)["input_ids"]:
        used.update(ids)
    keep = sorted(used)  # old ids, ascending: [PAD]=0 stays first
    vocab = tok.convert_ids_to_tokens(keep)
    model = AutoModel.from_pretrained(src, add_pooling_layer=False)
    emb = model.embeddings.word_embeddings.weight.data[torch.tensor(keep)].clone()
    model.resize_token_embeddings(len(keep))
    model.embeddings.word_embeddings.weight.data.copy_(emb)
    model.config.vocab_size = len(keep)
    target = out / "minilm"
    target.mkdir(parents=True, exist_ok=True)
    # Re-index the WordPiece vocabulary inside the fast tokenizer's own JSON, keeping its normaliser and specials.
    spec = json.loads((Path(src) / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {token: i for i, token in enumerate(vocab)}
    new_id = {old: new for new, old in enumerate(keep)}
    for added in spec.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    for special in (spec.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(src) / name, target / name)
    (target / "tokenizer.json").write_text(json.dumps(spec))
    (target / "vocab.txt").write_text("\n".join(vocab) + "\n")
    small = AutoTokenizer.from_pretrained(target)
    for a, b in zip(tok(texts)["input_ids"], small(texts)["input_ids"], strict=True):  # same pieces, new ids
        if [keep[i] for i in b] != a:
            raise RuntimeError("trimmed vocabulary tokenises a text differently; refusing to pack")
    model.half().save_pretrained(target, safe_serialization=True)
    (target / "PACKED.json").write_text(json.dumps({"source": src, "vocab": len(keep)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("gpu_payload"))
    ap.add_argument("--quality", type=int, default=82)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    cases = pack_images(args.data, args.out / "release", args.quality)
    pack_lite0(args.out)
    pack_minilm([c.text for c in cases], args.out)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size
             for p in args.out.iterdir()}
    print(json.dumps({k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()}, indent=2))
    print(f"total {sum(sizes.values()) / 2**20:.1f} MiB for {len(cases)} cases")


if __name__ == "__main__":
    main()
