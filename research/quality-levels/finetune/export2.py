"""ckpt -> weights with levels at positions T along the learned log-step ladder (interpolated/extrapolated)."""
import sys, dataclasses, numpy as np, torch
from pathlib import Path
from PIL import Image
from hybrid_codec.models import Autoencoder
from hybrid_codec.levels import export_levels
torch.set_num_threads(2)
ckpt, out, ts = sys.argv[1], sys.argv[2], [float(t) for t in sys.argv[3].split(',')]
base = Autoencoder.from_pretrained('/work/main/weights/native.safetensors')
s = torch.load(ckpt)
cfg = dataclasses.replace(base.config, name='photo', quality_levels=len(ts))
model = Autoencoder(cfg)
model.load_state_dict(s['model'], strict=False)
model.eval()
pr = s['proxy']
log = pr['log_steps'] if 'log_steps' in pr else pr['scaled_log_steps'] * 100.0  # (L, C)
L = log.shape[0]
rows = []
for t in ts:
    i = min(max(int(np.floor(t)), 0), L - 2)
    f = t - i
    rows.append(log[i] * (1 - f) + log[i + 1] * f)
steps = torch.stack(rows).exp()
model.levels.offset.copy_(s['proxy']['offset'])
lat = []
with torch.no_grad():
    for p in sorted(Path('/work/shared/data/photos').glob('*.png')):
        a = torch.from_numpy(np.array(Image.open(p).convert('RGB'))).permute(2, 0, 1)[None]
        h, w = a.shape[-2:]
        a = torch.nn.functional.pad(a.float(), (0, -w % 8, 0, -h % 8), mode='replicate')
        lat.append(model.encoder(a / 255)[0])
export_levels(model.levels, steps, lat)
model.save_pretrained(out)
print('steps', steps)
