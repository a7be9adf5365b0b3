"""Throughput of the `titans_mac` decoder and the MultimodalMAC API: cached vs uncached generation.

    python benchmarks/titans_throughput.py [--device cpu|cuda] [--sizes tiny,demo] [--batch 16]
           [--steps 20] [--threads N] [--multimodal]

Prints one JSON object: for every size, tokens/s of greedy decoding through
`seesay.decoding.greedy` with the library's cache (`cached`) and with full recomputation every
step (`uncached`), beam-3 captions/s (cached), and teacher-forced training tokens/s
(forward + backward + AdamW). `--multimodal` adds MultimodalMAC.generate at the sizes of the
README example (ViT-B/16, text_dim 384, depth 8, segment_len 32) or tiny ones on CPU: the
token-level call (cached and uncached) and the captioner call (greedy tokens/s, beam-3
captions/s; these may stop early at the byte tokenizer's eos).
Decoding runs exactly --steps steps (the <end> id is unreachable), so tokens = batch x steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings

import torch
from roofline import best_of

SIZES = {
    # tests' scale
    "tiny": dict(model=dict(dim=64, depth=2, heads=2, dim_head=32, num_image_tokens=4, max_len=24),
                 vocab=500, enc_dim=64, grid=4),
    # the builder's defaults with a demo-sized vocabulary and a 14x14 grid of 512-d regions
    "demo": dict(model=dict(), vocab=2000, enc_dim=512, grid=14),
    # defaults with the tutorial's 10k vocabulary and 2048-d ResNet-101 regions
    "paper": dict(model=dict(), vocab=10000, enc_dim=2048, grid=14),
}


def timed(fn, device, repeats: int = 1) -> float:
    return best_of(fn, repeats, device, warmup=True)  # warm-up: allocations, kernels


def bench_decoder(name: str, cfg: dict, args, device: torch.device) -> dict:
    from seesay.decoders.titans_mac import build
    from seesay.decoding import beam_search, greedy
    from seesay.encoders.base import EncoderOutput

    torch.manual_seed(0)
    dec = build(vocab_size=cfg["vocab"], enc_dim=cfg["enc_dim"], **cfg["model"]).to(device).eval()
    b, g = args.batch, cfg["grid"]
    enc = EncoderOutput(torch.randn(b, g * g, cfg["enc_dim"], device=device),
                        torch.randn(b, cfg["enc_dim"], device=device), (g, g))
    steps = args.steps
    unreachable = -1
    out = {"params_M": round(sum(p.numel() for p in dec.parameters()) / 1e6, 2),
           "segment_len": dec.segment_len, "num_image_tokens": dec.num_image_tokens, "batch": b, "steps": steps}
    for mode in ("cached", "uncached"):
        dec.use_cache = mode == "cached"
        t = timed(lambda: greedy(dec, enc, bos=1, eos=unreachable, max_len=steps), device, args.repeats)
        out[f"greedy_{mode}_tokens_per_s"] = round(b * steps / t, 1)
        out[f"greedy_{mode}_s"] = round(t, 3)
        print(f"# {name} greedy {mode}: {out[f'greedy_{mode}_tokens_per_s']} tokens/s", file=sys.stderr, flush=True)
    dec.use_cache = True
    r = greedy(dec, enc, bos=1, eos=unreachable, max_len=steps)
    dec.use_cache = False
    r2 = greedy(dec, enc, bos=1, eos=unreachable, max_len=steps)
    out["cached_equals_uncached"] = bool(torch.equal(r.tokens, r2.tokens))
    dec.use_cache = True
    t = timed(lambda: beam_search(dec, enc, bos=1, eos=unreachable, beam_size=3, max_len=steps), device, 1)
    out["beam3_cached_captions_per_s"] = round(b / t, 2)
    print(f"# {name} beam3: {out['beam3_cached_captions_per_s']} captions/s", file=sys.stderr, flush=True)
    out["speedup_cached_over_uncached"] = round(out["greedy_cached_tokens_per_s"] / out["greedy_uncached_tokens_per_s"], 2)
    # training throughput (teacher forcing, caption length = steps + 2)
    dec.train()
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
    tok = torch.randint(3, cfg["vocab"], (b, steps + 2), device=device)
    lengths = torch.full((b,), steps + 2, device=device)

    def train_step():
        logits = dec(enc, tok, lengths).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = timed(train_step, device, args.repeats)
    out["train_tokens_per_s"] = round(b * (steps + 1) / t, 1)
    return out


def bench_multimodal(args, device: torch.device) -> dict:
    from seesay.multimodal import MultimodalMAC

    torch.manual_seed(0)
    if args.multimodal_size == "example":
        kw = dict(image_size=224, patch_size=16, vision_dim=768, vision_depth=12, vision_heads=12,
                  vision_mlp_dim=3072, vision_dropout=0.1, num_tokens=256, text_dim=384, depth=8, segment_len=32)
    else:
        kw = dict(image_size=32, patch_size=8, vision_dim=64, vision_depth=2, vision_heads=2, vision_mlp_dim=128,
                  num_tokens=256, text_dim=64, depth=2, segment_len=32, heads=2, dim_head=32, num_image_tokens=4)
    model = MultimodalMAC(**kw).to(device).eval()
    size = model.image_processor.image_size
    b = args.mm_batch
    prompt = torch.tensor([[ord(c) for c in "This is an image of "] + [model.image_token_id]] * b, device=device)
    images = torch.randn(b, 1, 3, size, size, device=device)
    pos = torch.full((b, 1), prompt.shape[1] - 1, device=device)
    new = args.mm_new_tokens
    out = {"size": args.multimodal_size, "batch": b, "new_tokens": new,
           "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    for mode in ("cached", "uncached"):
        t = timed(lambda m=mode: model.generate(prompt, images=images, image_positions=pos,
                                                max_length=prompt.shape[1] + new, temperature=0,
                                                use_cache=m == "cached"), device, 1)
        out[f"generate_{mode}_tokens_per_s"] = round(b * new / t, 1)
    # the captioner call (image tokens, bos, caption), through the same decode(); it may stop at eos early
    from seesay.decoding import Beam, Greedy

    got = {}
    t = timed(lambda: got.setdefault("greedy", model.generate(images[:, 0], Greedy(), max_len=new)), device, 1)
    out["caption_greedy_tokens_per_s"] = round(int(got["greedy"].lengths.sum()) / t, 1)
    t = timed(lambda: model.generate(images[:, 0], Beam(3), max_len=new), device, 1)
    out["caption_beam3_captions_per_s"] = round(b / t, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="tiny,demo")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--multimodal", action="store_true")
    p.add_argument("--multimodal-size", choices=["tiny", "example"], default=None)
    p.add_argument("--mm-batch", type=int, default=4)
    p.add_argument("--mm-new-tokens", type=int, default=40)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from roofline import benchmark_device

    device = benchmark_device(args.device)
    if args.multimodal_size is None:
        args.multimodal_size = "example" if device.type == "cuda" else "tiny"
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "decoder": {},
    }
    for name in [s for s in args.sizes.split(",") if s]:
        report["decoder"][name] = bench_decoder(name, SIZES[name], args, device)
        print(json.dumps({name: report["decoder"][name]}), flush=True)
    if args.multimodal:
        report["multimodal"] = bench_multimodal(args, device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
