"""Time seesay.metrics on 5,000 images x 5 references: fast path, full path, and (with
--oracle) pycocoevalcap's own pipeline on the same captions. Prints one JSON object.

    python benchmarks/metrics_speed.py [--images 5000] [--refs 5] [--oracle] [--skip-full]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import time


class _Timer:
    """Wall-clock and CPU seconds (this process plus finished child processes, e.g. java)."""

    def __enter__(self):
        self.wall = time.perf_counter()
        self.cpu = self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall = round(time.perf_counter() - self.wall, 3)
        self.cpu = round(self._cpu() - self.cpu, 3)

    @staticmethod
    def _cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--refs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-full", action="store_true", help="time only the fast path")
    ap.add_argument(
        "--oracle", action="store_true", help="also time pycocoevalcap's own BLEU/ROUGE/CIDEr (+METEOR)"
    )
    args = ap.parse_args()

    from seesay.metrics import compute_scores, score_tokenized, tokenize_corpus
    from seesay.metrics.synthetic import make_corpus

    results, refs = make_corpus(args.images, args.refs, seed=args.seed, varied=False)
    out: dict = {
        "images": len(results),
        "refs_per_image": args.refs,
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        "java": shutil.which("java") is not None,
        "cpus": os.cpu_count(),
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
    }

    with _Timer() as t:
        report = compute_scores(results, refs)
    out["fast_s"], out["fast_cpu_s"] = t.wall, t.cpu
    out["fast_CIDEr"] = report.corpus["CIDEr"]

    with _Timer() as t:
        gts = tokenize_corpus(refs)
        res = {k: v[0] for k, v in tokenize_corpus({k: [v] for k, v in results.items()}).items()}
    out["fast_tokenize_s"] = t.wall
    with _Timer() as t:
        score_tokenized(gts, res)
    out["fast_scoring_only_s"] = t.wall

    if not args.skip_full:
        with _Timer() as t:
            full = compute_scores(results, refs, full=True)
        out["full_s"], out["full_cpu_s"] = t.wall, t.cpu
        out["full_tokenizer"] = "java" if out["java"] else "python"
        out["full_METEOR"] = full.corpus["METEOR"]
        out["full_SPICE"] = full.corpus["SPICE"]
        out["full_notes"] = list(full.notes)

    if args.oracle:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with contextlib.redirect_stdout(io.StringIO()):
            with _Timer() as t:
                g = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
                r = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in results.items()})
            out["pycocoevalcap_tokenize_s"] = t.wall
            with _Timer() as t:
                Bleu(4).compute_score(g, r)
                Rouge().compute_score(g, r)
                Cider().compute_score(g, r)
            out["pycocoevalcap_bleu_rouge_cider_s"], out["pycocoevalcap_bleu_rouge_cider_cpu_s"] = (
                t.wall,
                t.cpu,
            )
        if not args.skip_full and out["java"]:
            from pycocoevalcap.meteor.meteor import Meteor

            with _Timer() as t:
                m = Meteor()
                m.compute_score(g, r)
                del m
            out["pycocoevalcap_meteor_s"] = t.wall
    out["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
