"""A task's records sorted into documents (by split) and skips (by reason): the parsing half of a tokenizer task.

`prepare` runs it where there is time for it: in the worker that encodes the task, or in the reader (the main
process) where it has a core beside the workers and no worker waits for work. With one worker on two cores the
reader's core is otherwise idle between tasks, and parsing there takes JSON decoding, record checks and the split
hash (~4 % of the run) off the worker, whose encode is the run's pace. Either way the documents, their order and
every count are the same.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from data_prep.readers import RawRecord, parse_record

SPLITS = ("train", "val")
SKIP_EXAMPLES_PER_TASK = 5


def is_validation(text: str, fraction: float, seed: int) -> bool:
    """Deterministic split: a keyed hash of the text; identical documents always land on the same side."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


@dataclass(frozen=True)
class DocRules:
    """What decides a record's fate: the subset filters and the validation split."""

    include: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    val_fraction: float = 0.0
    split_seed: int = 1234


@dataclass
class TaskDocs:
    # per split: the documents' texts and their Pile subset names, in input order
    texts: dict[str, list[str]]
    subsets: dict[str, list[str]]
    skips: Counter
    # the first few skipped records: {"source", "line", "reason"}
    examples: list[dict]
    licenses: Counter
    n_records: int

    def pack(self) -> bytes:
        """Bytes for the spill file that carries these documents to a worker. Each split's texts travel as one
        UTF-8 buffer and their end offsets: one copy each way, where pickling the str objects one by one cost as
        much as the parsing that was moved."""
        splits = {}
        for split, texts in self.texts.items():
            encoded = [t.encode("utf-8") for t in texts]
            splits[split] = (b"".join(encoded), np.cumsum([len(e) for e in encoded], dtype=np.int64))
        return pickle.dumps((splits, self.subsets, self.skips, self.examples, self.licenses, self.n_records),
                            protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def unpack(cls, data: bytes) -> TaskDocs:
        splits, subsets, skips, examples, licenses, n_records = pickle.loads(data)
        texts = {}
        for split, (buffer, ends) in splits.items():
            ends = ends.tolist()
            texts[split] = [buffer[a:b].decode("utf-8") for a, b in zip([0, *ends[:-1]], ends)]
        return cls(texts, subsets, skips, examples, licenses, n_records)


def classify(records: Iterable[RawRecord], rules: DocRules) -> TaskDocs:
    """Parse and check every record (`parse_record`), count the skipped ones by reason, split the documents."""
    docs = TaskDocs({s: [] for s in SPLITS}, {s: [] for s in SPLITS}, Counter(), [], Counter(), 0)
    for rec in records:
        docs.n_records += 1
        parsed = parse_record(rec.payload, rules.include, rules.exclude)
        if parsed.text is None:
            docs.skips[parsed.reason] += 1
            if len(docs.examples) < SKIP_EXAMPLES_PER_TASK:
                docs.examples.append({"source": rec.source, "line": rec.line, "reason": parsed.reason})
            continue
        split = "val" if is_validation(parsed.text, rules.val_fraction, rules.split_seed) else "train"
        docs.texts[split].append(parsed.text)
        docs.subsets[split].append(parsed.subset)
        if parsed.license:
            docs.licenses[parsed.license] += 1
    return docs
