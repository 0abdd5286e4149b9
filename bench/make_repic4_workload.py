"""Write bench/repic4_workload.json: the shape of RePIC's 4-concept captioning evaluation, for bench/perf.py.

Reads the real evaluation data (`../shared/repic_eval/data`, RePIC commit 122ffa6): the 105 conversations of
`query_tot/4_concept_query_templates.json` (4 group photos, each with its 4-concept subsets), their references in
`concept_dict` order (RePIC's retriever under skip-retrieval, `repic.eval.captioning.skip_references`), each image's
size as `qwen_vl_utils` resizes it at the paper's `max_pixels` (1024·28², `repic.vlm.preprocess.fetch_image`), each
concept's display name and the word count of its info. No pixels or info text are kept: the benchmark draws random
pixels at these sizes and filler words of these counts.

    .venv/bin/python bench/make_repic4_workload.py ../shared/repic_eval/data bench/repic4_workload.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repic.vlm.preprocess import smart_resize  # noqa: E402

MAX_PIXELS = 1024 * 28 * 28


def main(data: str, out: str) -> None:
    root = Path(data)
    queries = json.loads((root / "query_tot/4_concept_query_templates.json").read_text(encoding="utf-8"))
    database = json.loads((root / "database_tot/database_4_concepts/database_mod.json").read_text(encoding="utf-8"))
    concepts = database["concept_dict"]

    def size(rel: str) -> list[int]:
        with Image.open(root / rel.removeprefix("./data/")) as im:
            w, h = im.size
        rh, rw = smart_resize(h, w, max_pixels=MAX_PIXELS)
        return [rw, rh]

    images: dict[str, list[int]] = {}
    names: dict[str, str] = {}
    info_words: dict[str, int] = {}
    prompts = []
    for qi, (query, subsets) in enumerate(queries.items()):
        qid = f"query{qi}"
        images[qid] = size(query)
        for subset in subsets:
            refs = [k for k in concepts if k in subset]
            for k in refs:
                if k not in images:
                    images[k] = size(concepts[k]["image"])
                    names[k] = concepts[k]["name"]
                    info_words[k] = len(concepts[k]["info"].split())
            prompts.append(refs + [qid])
    doc = {"source": "RePIC data/ at 122ffa6: query_tot/4_concept_query_templates.json, "
                     "database_tot/database_4_concepts/database_mod.json; sizes after qwen_vl_utils' resize at "
                     "max_pixels 1024*28*28",
           "images": images, "names": names, "info_words": info_words, "prompts": prompts}
    Path(out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    shown = sum(map(len, prompts))
    print(f"{out}: {len(prompts)} conversations, {shown} images shown, {len(images)} distinct")


if __name__ == "__main__":
    main(*sys.argv[1:3])
