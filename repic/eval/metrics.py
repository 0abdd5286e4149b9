"""Name precision / recall / F1 of personalized captions: RePIC's scoring protocol and a corrected one.

`repic` matches RePIC's `evaluation/eval_single_concept.py`, `eval_multi_2_concept.py` and
`eval_multi_4_concept.py` exactly:

- remove `</s>`, split on whitespace, strip `.,!?;:()[]{}"'-` from each token's ends, drop empty tokens;
- lowercase caption and keys for `single` and `multi4`; `multi2` is case-sensitive;
- candidate pool = the set of ground-truth keys in the file (for `single`, each row's first key);
- a key is present if its bracketed form (`<anya>`) or bare form (`anya`) equals a token;
- per ground-truth slot: "correct" if that key is present, else "miss" if a pool key outside this row's
  ground truth is present, else "none";
- precision = correct / (correct + miss), recall = correct / slots, F1 their harmonic mean (0 if both are 0).

Consequences kept on purpose: a multi-word key (`<black widow>`) can never equal a whitespace token, and
`<Anya>'s` / `Anya's` do not match, because `'s` is not stripped.

`strict` keeps the tokenisation and case rules but also finds multi-word keys as token phrases, accepts a
possessive `'s` (also with a typographic apostrophe) and, given the database, the display names of
`concept_dict[key]["name"]` (bare and bracketed, e.g. "Iron Man" / `<Iron Man>` for `<ironman>`).
It is reported beside `repic`, never instead of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from repic.core.io import RepicError
from repic.core.layout import PROTOCOLS, SETTINGS

PUNCT_STRIP = ".,!?;:()[]{}\"'-"
_POSSESSIVES = ("'s", "\u2019s")


def strip_brackets(key: str) -> str:
    """'<Anya>' -> 'Anya'; anything not wrapped in angle brackets is returned unchanged."""
    return key[1:-1] if key.startswith("<") and key.endswith(">") else key


def tokenize_caption(caption: str, lowercase: bool) -> list[str]:
    """RePIC's caption tokens: drop `</s>`, split on whitespace, strip boundary punctuation, drop empties.

    >>> tokenize_caption("<Anya> and (Bond)! </s> -", lowercase=False)
    ['<Anya>', 'and', 'Bond']
    """
    caption = caption.replace("</s>", "")
    if lowercase:
        caption = caption.lower()
    return [w.strip(PUNCT_STRIP) for w in caption.split() if w.strip(PUNCT_STRIP)]


def _token_variants(token: str) -> set[str]:
    """A token and, if it ends in a possessive `'s`, the token without it (strict protocol)."""
    variants = {token}
    for suffix in _POSSESSIVES:
        if token.endswith(suffix):
            stem = token[: -len(suffix)].strip(PUNCT_STRIP)
            if stem:
                variants.add(stem)
    return variants


class _Matcher:
    """Decides which pool keys a caption mentions, under one protocol and case rule.

    The pool's surface forms are tokenised once, and indexed by their first token, so that a caption costs
    O(its tokens) lookups whatever the size of the pool (a 216k-row file has a pool of thousands of keys).
    """

    def __init__(self, protocol: str, lowercase: bool, display_names: dict[str, str], pool: Sequence[str]):
        self.protocol = protocol
        self.lowercase = lowercase
        self.display_names = display_names
        # repic: a token equal to a key's normalised form or its bare form -> the keys' bare normalised forms.
        self._by_token: dict[str, set[str]] = {}
        # strict: first token of a surface phrase -> (phrase, the key's bare normalised form).
        self._by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for key in pool:
            bare = strip_brackets(self.norm(key))
            if protocol == "repic":
                for form in (self.norm(key), bare):
                    self._by_token.setdefault(form, set()).add(bare)
            else:
                for phrase in self._surface_phrases(key):
                    self._by_first.setdefault(phrase[0], []).append((tuple(phrase), bare))

    def norm(self, key: str) -> str:
        return key.lower() if self.lowercase else key

    def _surface_phrases(self, key: str) -> list[list[str]]:
        """Token sequences that mention `key` under `strict`: key, bare key, display name, <display name>."""
        forms = [key, strip_brackets(key)]
        name = self.display_names.get(key)
        if name:
            forms += [name, f"<{name}>"]
        phrases = []
        for form in forms:
            # A form is tokenised like a caption so that "<black widow>" -> ["<black", "widow>"].
            phrase = tokenize_caption(form, self.lowercase)
            if phrase and phrase not in phrases:
                phrases.append(phrase)
        return phrases

    def present(self, caption: str) -> set[str]:
        """Normalised, bracket-stripped forms of the pool keys the caption mentions."""
        tokens = tokenize_caption(caption, self.lowercase)
        found: set[str] = set()
        if self.protocol == "repic":
            for token in set(tokens):
                found |= self._by_token.get(token, set())
            return found
        variants = [_token_variants(t) for t in tokens]
        for start, starts in enumerate(variants):
            for variant in starts:
                for phrase, bare in self._by_first.get(variant, ()):
                    if bare in found or start + len(phrase) > len(variants):
                        continue
                    if all(phrase[i] in variants[start + i] for i in range(1, len(phrase))):
                        found.add(bare)
        return found


def _display_names(database: dict | None) -> dict[str, str]:
    if not database:
        return {}
    concepts = database.get("concept_dict", {})
    return {
        key: str(entry["name"])
        for key, entry in concepts.items()
        if isinstance(entry, dict) and entry.get("name")
    }


def prf(n_correct: int, n_predicted: int, n_slots: int) -> tuple[float, float, float]:
    """Precision, recall, F1 in percent (unrounded); 0 where a denominator is 0."""
    precision = n_correct / n_predicted if n_predicted else 0.0
    recall = n_correct / n_slots if n_slots else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return 100 * precision, 100 * recall, 100 * f1


def score_captions(
    rows: Sequence[Sequence[Any]],
    setting: str,
    protocol: str = "repic",
    database: dict | None = None,
    source: str | os.PathLike | None = None,
) -> tuple[dict, list[dict]]:
    """Score caption rows `[query_image, [gt keys], caption, question]` by name precision / recall / F1.

    Returns the summary `{"precision", "recall", "f1"` (percent, unrounded), `"n_slots", "n_rows",
    "n_correct", "n_miss"}` and one record per ground-truth slot
    `{"query_image", "row", "slot", "key", "outcome"}` with outcome "correct" / "miss" / "none".
    `database` (a `database_mod.json` dict) adds display names under `strict`; `repic` ignores it.

    >>> rows = [["q1.jpg", ["<Anya>", "<Bond>"], "Anya walks <Bond>.", "Caption?"],
    ...         ["q2.jpg", ["<Bluey>", "<Bingo>"], "anya and a dog", "Caption?"]]
    >>> summary, _ = score_captions(rows, "multi2")
    >>> round(summary["precision"], 1), summary["recall"], round(summary["f1"], 1)
    (100.0, 50.0, 66.7)
    """
    if setting not in SETTINGS:
        raise RepicError(f"scoring setting {setting!r}: expected one of {', '.join(SETTINGS)}")
    if protocol not in PROTOCOLS:
        raise RepicError(f"scoring protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    n_keys = SETTINGS[setting].n_concepts
    for i, row in enumerate(rows):
        if len(row[1]) != n_keys:
            where = f"{source}: " if source is not None else ""
            raise RepicError(
                f"{where}caption row {i}: setting {setting} expects {n_keys} gt key(s), got {len(row[1])}"
            )

    # Only 2-concept scoring is case-sensitive in the original (its script never lowercases).
    pool = sorted({k for row in rows for k in row[1]})
    matcher = _Matcher(protocol, lowercase=not SETTINGS[setting].case_sensitive,
                       display_names=_display_names(database), pool=pool)
    # bare normalised form -> the normalised pool keys with that form ("<anya>" and "anya" share "anya"), so the
    # miss rule below looks only at what the caption mentions instead of walking the pool for every row.
    keys_of_bare: dict[str, set[str]] = {}
    for k in pool:
        keys_of_bare.setdefault(strip_brackets(matcher.norm(k)), set()).add(matcher.norm(k))

    records: list[dict] = []
    for i, row in enumerate(rows):
        query_image, gt_keys, caption = row[0], list(row[1]), row[2]
        present = matcher.present(caption)
        gt_norm = {matcher.norm(k) for k in gt_keys}
        # A pool key outside this row's ground truth is mentioned (the original's `others & present`).
        wrong_present = any(keys_of_bare[bare] - gt_norm for bare in present)
        for slot, key in enumerate(gt_keys):
            if strip_brackets(matcher.norm(key)) in present:
                outcome = "correct"
            elif wrong_present:
                outcome = "miss"
            else:
                outcome = "none"
            records.append(
                {"query_image": query_image, "row": i, "slot": slot, "key": key, "outcome": outcome}
            )

    n_correct = sum(r["outcome"] == "correct" for r in records)
    n_miss = sum(r["outcome"] == "miss" for r in records)
    precision, recall, f1 = prf(n_correct, n_correct + n_miss, len(records))
    summary = {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_slots": len(records),
        "n_rows": len(rows),
        "n_correct": n_correct,
        "n_miss": n_miss,
    }
    return summary, records
