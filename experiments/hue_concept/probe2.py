"""Hue-concept TI probe on a model trained with unnamed colours. argv: model steps lr nvec init form cfg"""
import sys, os, time, re, torch, numpy as np
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from tiengine.evaluate_base import load_toy_model, generate, held_out_prompts
from tiengine.toyworld import sample_scenes, canonical_caption, render
CONCEPT_HUE = float(os.environ.get("HUE", "290"))
from tiengine.toyworld_eval import detect, prompt_adherence
from tiengine.conditioning import encode_texts
from tiengine.tokenizer import ClipTokenizer
model_dir, steps, lr, nvec, init_word, form, cfg = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], float(sys.argv[7])
window = 12
m = load_toy_model(model_dir)
tok = ClipTokenizer.default()
tok.add_embedding("tw-concept", nvec)
rng = np.random.default_rng(0)
from tiengine.toyworld import sample_scene, held_out_combinations
ho = held_out_combinations()
scenes = [sample_scene(rng, held_out=ho, unnamed_hue=CONCEPT_HUE) for _ in range(5)]
imgs = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0,3,1,2)
with torch.no_grad():
    lat = m.vae.encode(imgs.float()/127.5-1).mean * m.config.vae.scaling_factor
def with_concept(attrs):
    if form == "slot":
        return canonical_caption({**attrs, "colour": "tw-concept"})
    return canonical_caption({**attrs, "colour": ""}) + ", tw-concept"
caps = [with_concept(s.named()) for s in scenes]
print(caps, [round(s.hue) for s in scenes])
table = m.slot.encoder.text_model.embeddings.token_embedding.weight
init = table[tok.encode(init_word)[0]].detach().clone()
rows = torch.nn.Parameter(init.repeat(nvec,1))
opt = torch.optim.AdamW([rows], lr=lr, weight_decay=0)
ac = m.schedule.alphas_cumprod
g = torch.Generator().manual_seed(0)
t0 = time.time()
for step in range(steps):
    z = encode_texts(caps, tok, [m.slot], {"clip_l": rows}).context
    t = torch.randint(int(os.environ.get("TMIN", "0")), 1000, (5,), generator=g)
    noise = torch.randn(lat.shape, generator=g)
    a = ac[t].view(-1,1,1,1)
    x = a.sqrt()*lat + (1-a).sqrt()*noise
    loss = (m.unet(x, t, z) - noise).square().mean()
    opt.zero_grad(); loss.backward(); opt.step()
print('train', round(time.time()-t0), 's', flush=True)
prompts = held_out_prompts(1)
def hit(d):
    return bool(d.objects) and all(abs((o.hue - CONCEPT_HUE + 180) % 360 - 180) <= window for o in d.objects)
def colourless(p): return re.sub(r"\b(red|green|blue|yellow) ", "", p)
def concept_prompt(p):
    return re.sub(r"\b(red|green|blue|yellow)\b", "tw-concept", p) if form == "slot" else colourless(p) + ", tw-concept"
with torch.no_grad():
    for label, ps in [("embedding", [concept_prompt(p) for p in prompts]), ("no colour", [colourless(p) for p in prompts]), ("purple", [colourless(p) + ", purple" for p in prompts]), ("named", prompts)]:
        out = list(generate(m, ps, seed=100, tokenizer=tok, extra_rows={"clip_l": rows.detach()}, cfg_scale=cfg))
        ds = [detect(np.asarray(i)) for i in out]
        adh = prompt_adherence(out, [colourless(p) for p in prompts])
        hs = [round(np.median([o.hue for o in d.objects])) if d.objects else -1 for d in ds]
        print(label, 'hit', round(np.mean([hit(d) for d in ds]), 3), 'adh(no colour)', round(adh, 3), hs[:20], flush=True)
