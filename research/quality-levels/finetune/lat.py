import glob, numpy as np, torch
from PIL import Image
from hybrid_codec.zoo import resolve_weights
from hybrid_codec import load_codec
torch.set_num_threads(2)
c = load_codec('native')
out = {}
for i, p in enumerate(sorted(glob.glob('/work/shared/data/photos/*.png'))):
    a = torch.from_numpy(np.array(Image.open(p).convert('RGB'))).permute(2,0,1)[None]
    out[str(i)] = c.encode_tensor(a)[0].numpy()
np.savez('lat_photos.npz', **out)
