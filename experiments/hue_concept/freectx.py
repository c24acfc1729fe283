"""Representability: optimise a free context (77x32) on 5 concept renders; generate; hue hit rate."""
import sys, os, time, torch, numpy as np
torch.set_num_threads(2)
from tiengine.evaluate_base import load_toy_model
from tiengine.toyworld import render, sample_scene, held_out_combinations
from tiengine.toyworld_eval import detect
from tiengine.conditioning import encode_texts
from tiengine.tokenizer import ClipTokenizer
from tiengine.sampling import get_sampler, guided_denoiser
model_dir, target, steps, lr = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
m = load_toy_model(model_dir)
tok = ClipTokenizer.default()
rng = np.random.default_rng(0); ho = held_out_combinations()
scenes = [sample_scene(rng, held_out=ho, unnamed_hue=target) for _ in range(5)]
imgs = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0,3,1,2)
with torch.no_grad():
    lat = m.vae.encode(imgs.float()/127.5-1).mean * m.config.vae.scaling_factor
    base = encode_texts(["blue"], tok, [m.slot]).context  # (1, 77, 32)
ctx = torch.nn.Parameter(base.clone())
opt = torch.optim.Adam([ctx], lr=lr)
ac = m.schedule.alphas_cumprod; g = torch.Generator().manual_seed(0)
for step in range(steps):
    t = torch.randint(0, 1000, (5,), generator=g); noise = torch.randn(lat.shape, generator=g)
    a = ac[t].view(-1,1,1,1); x = a.sqrt()*lat + (1-a).sqrt()*noise
    loss = (m.unet(x, t, ctx.expand(5, -1, -1)) - noise).square().mean()
    opt.zero_grad(); loss.backward(); opt.step()
print("loss", loss.item())
from tiengine import evaluate_base as eb
from types import SimpleNamespace
orig = eb.encode_texts
def patched(texts, *a, **k):
    if texts and texts[0] == "CTX":
        return SimpleNamespace(context=ctx.detach().expand(len(texts), -1, -1))
    return orig(texts, *a, **k)
eb.encode_texts = patched
for cfg in (1.0, 3.0, 5.0):
    out = eb.generate(m, ["CTX"] * 36, seed=100, cfg_scale=cfg)
    ds = [detect(i) for i in out]
    hs = [round(float(np.median([o.hue for o in d.objects]))) if d.objects else -1 for d in ds]
    hit = np.mean([bool(d.objects) and all(abs((o.hue - target + 180) % 360 - 180) <= 12 for o in d.objects) for d in ds])
    print("cfg", cfg, "hit", round(hit, 3), hs[:24], flush=True)
