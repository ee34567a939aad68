"""Small corpora the tests write: varied sentences with metadata, in BEIR and plain JSONL."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "astronomy": ["telescope", "galaxy", "orbit", "comet", "nebula", "planet", "star cluster"],
    "cooking": ["sourdough", "simmer", "saffron", "braise", "caramel", "knife skills", "spice blend"],
    "networks": ["packet loss", "router", "latency", "congestion control", "TLS handshake", "DNS cache"],
    "medicine": ["vaccine", "antibody", "clinical trial", "dosage", "inflammation", "blood pressure"],
    "sailing": ["mainsail", "tacking", "keel", "mooring", "tide table", "spinnaker"],
}
VERBS = ["explains", "compares", "measures", "describes", "questions", "improves", "reviews"]
ENDINGS = [
    "in careful detail", "for beginners", "with new data", "over three seasons", "using simple tools",
    "at low cost", "in the field", "under pressure", "from first principles",
]


def make_documents(count: int, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    documents = []
    topics = list(TOPICS)
    for i in range(count):
        topic = topics[i % len(topics)]
        words = rng.sample(TOPICS[topic], 3)
        text = (
            f"This note {rng.choice(VERBS)} {words[0]} and {words[1]} {rng.choice(ENDINGS)}; "
            f"it also touches on {words[2]} ({topic}, item {i})."
        )
        documents.append(
            {"_id": f"d{i}", "title": f"{topic.title()} {i}", "text": text,
             "topic": topic, "lang": "en" if i % 3 else "de", "year": 2000 + i % 20}
        )
    return documents


def write_beir(folder: Path, documents: list[dict], queries: dict[str, str] | None = None, qrels: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as handle:
        for document in documents:
            handle.write(json.dumps(document) + "\n")
    if queries is not None:
        with (folder / "queries.jsonl").open("w") as handle:
            for qid, text in queries.items():
                handle.write(json.dumps({"_id": qid, "text": text}) + "\n")
        (folder / "qrels").mkdir(exist_ok=True)
        with (folder / "qrels" / "test.tsv").open("w") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for qid, judged in (qrels or {}).items():
                for doc_id, score in judged.items():
                    handle.write(f"{qid}\t{doc_id}\t{score}\n")
    return folder
