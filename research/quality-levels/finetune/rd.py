import sys, glob, numpy as np, torch, time
from PIL import Image
from hybrid_codec.codec import Codec
from hybrid_codec.models import Autoencoder
torch.set_num_threads(2)
c = Codec(Autoencoder.from_pretrained(sys.argv[1]))
files = sorted(glob.glob(sys.argv[2]))[: int(sys.argv[3]) if len(sys.argv) > 3 else None]
for q in range(1, c.quality_levels + 1):
    bpp, ps = [], []
    for f in files:
        im = Image.open(f).convert('RGB'); a = np.asarray(im).astype(np.float64)
        data = c.compress(im, q); out = np.asarray(c.decompress(data)).astype(np.float64)
        bpp.append(len(data) * 8 / (a.shape[0] * a.shape[1])); ps.append(10 * np.log10(255**2 / ((out - a) ** 2).mean()))
    print(q, '%.4f %.2f' % (np.mean(bpp), np.mean(ps)), flush=True)
