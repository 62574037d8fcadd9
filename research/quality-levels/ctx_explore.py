"""Compare context designs by cross-entropy (tables fit on photos 001-044, measured on 045-049)."""
import numpy as np
from common import *
P = latents(None, PHOTOS, 'lat_photos.npz')
MU = np.array([l.reshape(4,-1).mean(1) for l in P[:44]]).mean(0)
def H(sym, ctx, sym_te, ctx_te, nsym, nctx):
    cnt = np.ones((nctx, nsym)); np.add.at(cnt, (ctx, sym), 1)
    p = cnt / cnt.sum(1, keepdims=True)
    return -np.log2(p[ctx_te, sym_te]).sum()
def feats(codes, design, K=6):
    # codes (4,h,w) int ; returns sym list, ctx list (flattened over all channels)
    C, h, w = codes.shape
    pad = np.pad(codes, ((0,0),(1,0),(1,0)), mode='constant')  # zeros outside
    left = pad[:, 1:, :-1]; top = pad[:, :-1, 1:]; tl = pad[:, :-1, :-1]
    cidx = np.broadcast_to(np.arange(C)[:,None,None], codes.shape)
    prev = np.concatenate([np.zeros_like(codes[:1]), codes[:-1]], 0)
    if design == 'none': s, k = codes, cidx*0
    elif design == 'leftval': s, k = codes, np.clip(left, -K, K)+K
    elif design == 'left_res': s, k = codes-left, 0*codes
    elif design == 'left_res_act': s, k = codes-left, np.minimum(np.abs(left-tl), 2*K)
    elif design == 'top_res_act': s, k = codes-top, np.minimum(np.abs(top-tl), 2*K)
    elif design == 'med_res_act':
        mx, mn = np.maximum(left, top), np.minimum(left, top)
        med = np.where(tl >= mx, mn, np.where(tl <= mn, mx, left+top-tl))
        s, k = codes-med, np.minimum(np.abs(left-tl)+np.abs(top-tl), 2*K)
    elif design == 'avg_res_act':
        pr = (left+top) >> 1 if False else np.floor_divide(left+top, 2)
        s, k = codes-pr, np.minimum(np.abs(left-top), 2*K)
    elif design == 'leftval_topval': s, k = codes, (np.clip(left,-K,K)+K)*(2*K+1)+np.clip(top,-K,K)+K
    elif design == 'prevch': s, k = codes, np.clip(prev, -K, K)+K
    elif design == 'prevch_res_top': s, k = codes-top, np.clip(prev,-K,K)+K
    else: raise ValueError(design)
    k = k + cidx * 1000
    return s.ravel(), k.ravel()
def run(step, designs):
    res = {}
    for d in designs:
        tr = [feats(np.round((l - MU[:,None,None])/step[:,None,None]).astype(np.int64), d) for l in P[:44]]
        te = [feats(np.round((l - MU[:,None,None])/step[:,None,None]).astype(np.int64), d) for l in P[44:]]
        s = np.concatenate([a for a,_ in tr]); k = np.concatenate([b for _,b in tr])
        st = np.concatenate([a for a,_ in te]); kt = np.concatenate([b for _,b in te])
        off = min(s.min(), st.min()); ns = max(s.max(), st.max()) - off + 1
        ku, kinv = np.unique(np.concatenate([k, kt]), return_inverse=True)
        bits = H(s-off, kinv[:len(k)], st-off, kinv[len(k):], ns, len(ku))
        npx = sum(l.shape[1]*l.shape[2]*64 for l in P[44:])
        res[d] = bits / npx
    return res
if __name__ == '__main__':
    designs = ['none','leftval','left_res','left_res_act','top_res_act','med_res_act','avg_res_act','leftval_topval','prevch','prevch_res_top']
    for q in [0.02, 0.05, 0.1, 0.2]:
        r = run(np.full(4, q), designs)
        print(q, ' '.join(f'{d}={v:.4f}' for d, v in r.items()), flush=True)
