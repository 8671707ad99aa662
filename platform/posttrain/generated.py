"""Built-in post-training sets, so the tiny pipeline has something real to learn on the embedded default.

Three sources, all deterministic by seed, each split into ``train`` and ``heldout`` by a hash of
its *source item* (a function's name — one function per name —, a problem's operands), so no function or problem
is in both splits:

* **instructions** from the curated corpus (Python files: the stdlib by default): for each function
  with a docstring, "What does the function `f` do?" → the docstring's first paragraph, and
  "Write a Python function `f` that <summary>" → the function's source;
* **arithmetic and small algorithmic tasks** with exact answers ("What is 17 + 5?" → "22"; the
  successor of n; the sorted/reversed list; the length of a word ...) — as chat examples and as
  ``{"prompt", "answer"}`` prompts (what the RL stage rewards and what the exact-match metric reads);
* **preference pairs** whose rejected side is corrupted: a wrong number (the answer ± a non-zero
  offset), a truncated docstring (continued with another's words, so not shorter), or another
  function's docstring (swapped).

``write_generated_sets`` writes three store artefacts (``train.jsonl`` + ``heldout.jsonl`` + ``stats.json``)
under a config-hashed prefix and registers them in the catalog as CHAT_DATA, PREFERENCE_DATA and
PROMPT_DATA; a committed artefact is reused on re-runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import textwrap
from dataclasses import dataclass
from typing import Iterable, Iterator

from pydantic import Field

from moeflow.platform import artifacts as A
from moeflow.platform.config import StageConfig

from .data import to_jsonl

SPLITS = ("train", "heldout")


class GeneratedDataConfig(StageConfig):
    """How much of each built-in set to make, and how it splits."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of sampling and of the corruptions")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="share of source items held out")
    max_functions: int = Field(400, ge=0, le=1_000_000, description="corpus functions turned into instructions (0: none)")
    max_source_chars: int = Field(600, ge=64, le=100_000, description="longest function source kept as an answer")
    num_arithmetic: int = Field(1500, ge=0, le=1_000_000, description="arithmetic/algorithmic problems (all splits)")
    max_operand: int = Field(30, ge=2, le=1_000_000, description="operands of the arithmetic problems are < this")
    max_files: int = Field(160, ge=1, le=1_000_000, description="stdlib files read when no curated dataset is given")


@dataclass(frozen=True)
class Function:
    qualname: str   # "<module path>:<line>:<name>": where it came from
    name: str
    summary: str    # first paragraph of the docstring, one line
    source: str


# ------------------------------------------------------------------ splitting
def split_of(key: str, heldout_fraction: float, seed: int) -> str:
    """'heldout' for a fixed share of keys (a hash, so the same key always lands in the same split)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


# ------------------------------------------------------------------ corpus functions
def functions_in(text: str, path: str, max_source_chars: int) -> Iterator[Function]:
    """Top-level functions (and methods) of a Python file that have a docstring; nothing on a syntax error."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        if len(summary) < 12:
            continue
        if node.end_lineno - node.lineno > max_source_chars // 8:  # cheap bound before joining lines
            continue
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        source = textwrap.dedent("\n".join(lines[first - 1: node.end_lineno]))  # whole lines: methods dedent too
        if len(source) > max_source_chars:
            continue
        yield Function(f"{path}:{node.lineno}:{node.name}", node.name, summary, source)


def stdlib_texts(max_files: int) -> Iterator[tuple[str, str]]:
    from moeflow.platform.data.sources import stdlib_root

    root = stdlib_root()
    paths = sorted(p for p in root.glob("*.py"))[:max_files]
    for p in paths:
        try:
            yield p.name, p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def curated_texts(curated_uri: str) -> Iterator[tuple[str, str]]:
    from moeflow.platform.data.documents import iter_artifact_documents

    for doc in iter_artifact_documents(curated_uri):
        yield doc.id, doc.text


def corpus_functions(texts: Iterable[tuple[str, str]], cfg: GeneratedDataConfig) -> list[Function]:
    seen: set[str] = set()
    out = []
    for path, text in texts:
        for fn in functions_in(text, path, cfg.max_source_chars):
            # one function per name: the prompt names only the function, so two `clear`s would be one
            # question with two answers (and could straddle the split)
            if fn.name in seen:
                continue
            seen.add(fn.name)
            out.append(fn)
    random.Random(cfg.seed).shuffle(out)
    return out[: cfg.max_functions]


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def instruction_examples(fn: Function) -> list[dict]:
    return [_chat(f"What does the function `{fn.name}` do?", fn.summary),
            _chat(f"Write a Python function `{fn.name}` that does this: {fn.summary}", fn.source)]


def docstring_pairs(fn: Function, others: list[Function], rng: random.Random) -> list[dict]:
    """Chosen = the true summary; rejected = a truncated summary, or another function's (swapped).

    The truncated one is cut after its first half and continued with the last words of another
    function's summary up to the original word count: a reply that goes astray and still ends like a
    summary, not a shorter one — a bare cut would be recognisable by its length alone (``tests`` check that a length/format-only
    scorer stays near chance on these pairs).
    """
    prompt = f"What does the function `{fn.name}` do?"
    words = fn.summary.split()
    pool = [o for o in others if o.summary != fn.summary]
    pairs = []
    if pool and len(words) >= 2:
        donor = pool[rng.randrange(len(pool))].summary.split()
        keep = max(1, len(words) // 2)
        need = len(words) - keep
        tail = (donor * (1 + need // len(donor)))[-need:] if need else []  # the donor's END: it ends like a summary
        cut = " ".join(words[:keep] + tail)
        if cut != fn.summary:
            pairs.append({"prompt": prompt, "chosen": fn.summary, "rejected": cut})
    if pool:
        other = pool[rng.randrange(len(pool))]
        pairs.append({"prompt": prompt, "chosen": fn.summary, "rejected": other.summary})
    return pairs


# ------------------------------------------------------------------ arithmetic and small tasks
TASKS = ("add", "sub", "mul", "succ", "sort", "reverse", "length")


def make_problem(task: str, rng: random.Random, max_operand: int) -> tuple[str, str, str]:
    """(key, prompt, exact answer). ``key`` identifies the problem for the split."""
    a, b = rng.randrange(max_operand), rng.randrange(max_operand)
    if task == "add":
        return f"add:{a}:{b}", f"What is {a} + {b}?", str(a + b)
    if task == "sub":
        a, b = max(a, b), min(a, b)
        return f"sub:{a}:{b}", f"What is {a} - {b}?", str(a - b)
    if task == "mul":
        a, b = a % 10, b % 10
        return f"mul:{a}:{b}", f"What is {a} * {b}?", str(a * b)
    if task == "succ":
        return f"succ:{a}", f"What number comes after {a}?", str(a + 1)
    items = [rng.randrange(max_operand) for _ in range(rng.randrange(3, 6))]
    if task == "sort":
        return f"sort:{items}", f"Sort the list {items}.", str(sorted(items))
    if task == "reverse":
        return f"reverse:{items}", f"Reverse the list {items}.", str(items[::-1])
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(2, 9)))
    return f"length:{word}", f"How many letters are in the word '{word}'?", str(len(word))


def arithmetic_problems(cfg: GeneratedDataConfig) -> list[tuple[str, str, str]]:
    """Distinct problems (by key), deterministic by seed."""
    rng = random.Random(cfg.seed + 1)
    seen: set[str] = set()
    out = []
    attempts = 0
    while len(out) < cfg.num_arithmetic and attempts < 50 * max(1, cfg.num_arithmetic):
        attempts += 1
        key, prompt, answer = make_problem(TASKS[attempts % len(TASKS)], rng, cfg.max_operand)
        if key not in seen:
            seen.add(key)
            out.append((key, prompt, answer))
    return out


def wrong_number(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the number ± a non-zero offset (lists: two entries swapped)."""
    try:
        value = int(answer)
    except ValueError:
        items = json.loads(answer)
        if len(items) >= 2 and items[0] != items[-1]:
            items[0], items[-1] = items[-1], items[0]
        else:
            items = items + [items[-1] + 1 if items else 0]
        return str(items)
    return str(value + rng.choice([-3, -2, -1, 1, 2, 3, 10]))


# ------------------------------------------------------------------ assembling the sets
def build_sets(cfg: GeneratedDataConfig, texts: Iterable[tuple[str, str]]) -> dict[str, dict[str, list[dict]]]:
    """{"chat"|"preference"|"prompt": {"train": [...], "heldout": [...]}} (JSON-ready records)."""
    rng = random.Random(cfg.seed + 2)
    sets: dict[str, dict[str, list[dict]]] = {k: {s: [] for s in SPLITS} for k in ("chat", "preference", "prompt")}
    functions = corpus_functions(texts, cfg) if cfg.max_functions else []
    by_split = {s: [f for f in functions if split_of(f"fn:{f.name}", cfg.heldout_fraction, cfg.seed) == s] for s in SPLITS}
    for split, fns in by_split.items():
        for fn in fns:
            sets["chat"][split] += instruction_examples(fn)
            sets["preference"][split] += docstring_pairs(fn, fns, rng)  # (itself as the swap: skipped there)
    for key, prompt, answer in arithmetic_problems(cfg):
        split = split_of(key, cfg.heldout_fraction, cfg.seed)
        sets["chat"][split].append(_chat(prompt, answer))
        sets["prompt"][split].append({"prompt": prompt, "answer": answer, "task": key.split(":")[0]})
        sets["preference"][split].append({"prompt": prompt, "chosen": answer, "rejected": wrong_number(answer, rng)})
    for kind in sets:
        for split in SPLITS:
            random.Random(f"{cfg.seed}:{kind}:{split}").shuffle(sets[kind][split])
    return sets


KIND_OF = {"chat": A.CHAT_DATA, "preference": A.PREFERENCE_DATA, "prompt": A.PROMPT_DATA}


@dataclass
class GeneratedSets:
    chat_uri: str
    preference_uri: str
    prompt_uri: str
    stats: dict


def write_generated_sets(store, cfg: GeneratedDataConfig, *, curated_uri: str | None = None,
                         output_prefix: str = "posttrain-data/generated", catalog=None,
                         dataset: str = "tiny") -> GeneratedSets:
    """Build the sets (from ``curated_uri``'s Python files, else the stdlib), write and register them."""
    prefix = f"{output_prefix.strip('/')}/{cfg.config_hash()}-{hashlib.sha256((curated_uri or 'stdlib').encode()).hexdigest()[:8]}"
    prefixes = {kind: f"{prefix}/{kind}" for kind in KIND_OF}
    if not all(store.artifact_exists(p) for p in prefixes.values()):
        texts = curated_texts(curated_uri) if curated_uri else stdlib_texts(cfg.max_files)
        sets = build_sets(cfg, texts)
        for kind, splits in sets.items():
            if store.artifact_exists(prefixes[kind]):
                continue
            counts = {s: len(rows) for s, rows in splits.items()}
            meta = {"kind": KIND_OF[kind], "generator": "moeflow.generated", "config": cfg.to_dict(),
                    "source": curated_uri or "python-stdlib", "counts": counts}
            with store.write_artifact(prefixes[kind], metadata=meta) as w:
                for split, rows in splits.items():
                    w.put_bytes(f"{split}.jsonl", to_jsonl(rows))
                w.put_json("stats.json", counts)
    stats = {kind: json.loads(store.read_artifact(p).get_bytes("stats.json")) for kind, p in prefixes.items()}
    uris = {kind: store.uri(p) for kind, p in prefixes.items()}
    if catalog is not None:
        for kind, uri in uris.items():
            art = store.read_artifact(prefixes[kind])
            catalog.register_dataset(A.posttrain_data_name(dataset, kind), uri, art.content_hash, stats=stats[kind],
                                     kind=KIND_OF[kind])
    return GeneratedSets(uris["chat"], uris["preference"], uris["prompt"], stats)
