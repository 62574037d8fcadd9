"""Variable-rate fine-tune of the shipped weights with the rate proxy (temporary driver; resumable)."""
import glob, math, os, sys, time, numpy as np, torch
from pathlib import Path
from hybrid_codec.models import Autoencoder
from hybrid_codec.levels import RateProxy
from hybrid_codec.data import RandomCrops
torch.set_num_threads(2)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 900
LAMBDAS = torch.tensor([20., 40., 80., 160., 320., 700., 1600.])
CKPT = Path('ft3/ckpt.pt')
paths = sorted(Path('/work/shared/data/photos').glob('*.png'))
model = Autoencoder.from_pretrained('/work/main/weights/native.safetensors').train()
d = np.load('lat_photos.npz'); P = [d[str(i)] for i in range(49)]
offset = torch.tensor(np.array([l.reshape(4, -1).mean(1) for l in P]).mean(0), dtype=torch.float32)
q = torch.tensor([0.09, 0.06, 0.04, 0.027, 0.018, 0.012, 0.007])
std = torch.tensor(np.concatenate([l.reshape(4, -1) for l in P], 1).std(1), dtype=torch.float32)
steps0 = q[:, None] * (std / std.mean())[None]
proxy = RateProxy(steps0, offset)
opt = torch.optim.AdamW([{'params': model.parameters(), 'lr': 1e-4, 'weight_decay': 0},
                         {'params': proxy.parameters(), 'lr': 1e-4, 'weight_decay': 0}])
start = 0
if not CKPT.exists():  # from stage 1's end
    s1 = torch.load('ft/ckpt.pt')
    model.load_state_dict(s1['model'])
    with torch.no_grad():
        proxy.scaled_log_steps.copy_(s1['proxy']['log_steps'] / proxy.GAIN)
        proxy.scaled_log_scales.copy_(s1['proxy']['log_scales'] / proxy.GAIN)
        proxy.offset.copy_(s1['proxy']['offset'])
if CKPT.exists():
    s = torch.load(CKPT)
    model.load_state_dict(s['model']); proxy.load_state_dict(s['proxy']); opt.load_state_dict(s['opt']); start = s['step']
crops = RandomCrops(paths, 128, 13, 0.25)
loader = iter(torch.utils.data.DataLoader(crops, batch_size=9, sampler=range(start * 9, STEPS * 9), num_workers=1))
L = len(LAMBDAS)
t0 = time.time(); hist = []
for step in range(start, STEPS):
    x = next(loader)
    level = (torch.arange(8) + step) % L  # 8 quantized crops, and the ninth through float latents
    y = model.encoder(x)
    yhat, bits = proxy(y[:8], level)
    out = model.decoder(torch.cat([yhat, y[8:]]), clamp=False)
    mse = ((out - x) ** 2).mean((1, 2, 3))
    bpp = bits / (x.shape[-1] * x.shape[-2])
    lam = LAMBDAS[level]
    loss = (((lam * mse[:8] + bpp) / lam ** 0.2).sum() + LAMBDAS[-1] ** 0.8 * mse[8]) / 9
    mse = mse[:8]
    for g in opt.param_groups[:1]:
        g['lr'] = 3e-5 * min(1, (step + 1) / 20) * (0.5 + 0.5 * math.cos(math.pi * step / STEPS))
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    hist.append([level.tolist(), mse.tolist(), bpp.tolist()])
    if (step + 1) % 25 == 0:
        h = hist[-25:]
        per = {}
        for lv, m, b in h:
            for a, mm, bb in zip(lv, m, b): per.setdefault(a, []).append((mm, bb))
        msg = ' '.join(f'L{a}:{-10*math.log10(np.mean([p[0] for p in v])):.2f}/{np.mean([p[1] for p in v]):.3f}' for a, v in sorted(per.items()))
        print(f'step {step+1} {time.time()-t0:.0f}s {msg}', flush=True)
        torch.save({'model': model.state_dict(), 'proxy': proxy.state_dict(), 'opt': opt.state_dict(), 'step': step + 1}, 'ft3/tmp.pt')
        os.replace('ft3/tmp.pt', CKPT)
print('done')
