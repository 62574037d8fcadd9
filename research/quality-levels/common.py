"""Shared helpers: load model, images, latents (cached), PSNR."""
import os, sys, glob, numpy as np, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vendor'))  # frozen copy of /work/main HEAD (main is being restructured)
from PIL import Image
torch.set_num_threads(1)
from hybrid_codec.models import Autoencoder
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vendor', 'native.safetensors')
PHOTOS = sorted(glob.glob('/work/shared/data/photos/*.png'))
CBSD = sorted(glob.glob('/work/shared/data/cbsd68/*'))

def load_model(path=WEIGHTS):
    return Autoencoder.from_pretrained(path)

def load_img(p):
    a = np.array(Image.open(p).convert('RGB'))
    return a

def pad8(x):
    H, W = x.shape[-2:]
    ph, pw = (-H) % 8, (-W) % 8
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode='replicate')
    return x

def to_tensor(a):
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255

@torch.no_grad()
def encode(m, a):
    return m.encoder(pad8(to_tensor(a)))[0]

@torch.no_grad()
def decode_psnr(m, lat, a):
    H, W = a.shape[:2]
    out = m.decoder(lat[None], clamp=True)[0, :, :H, :W]
    out8 = (out * 255).round().permute(1, 2, 0).numpy()
    mse = np.mean((out8 - a.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)

def latents(m, paths, cache=None):
    if cache and os.path.exists(cache):
        d = np.load(cache)
        return [d[str(i)] for i in range(len(d.files))]
    L = [encode(m, load_img(p)).numpy() for p in paths]
    if cache:
        np.savez(cache, **{str(i): l for i, l in enumerate(L)})
    return L
