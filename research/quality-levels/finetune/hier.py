import numpy as np
d = np.load('lat_photos.npz'); P = [d[str(i)] for i in range(len(d.files))]
MU = np.array([l.reshape(4,-1).mean(1) for l in P[:44]]).mean(0)
K = 11
def causal(X):
    C,h,w = X.shape
    pad = np.pad(X, ((0,0),(1,0),(1,0)))
    L = pad[:,1:,:-1]; T = pad[:,:-1,1:]
    pr = (L+T)//2; k = np.minimum(abs(L-T), K)
    ch = np.broadcast_to(np.arange(C)[:,None,None], X.shape)
    return (X-pr).ravel(), (ch*100+k).ravel()
def nb(X, ys, xs, offs):
    C,h,w = X.shape
    vals=[]; valid=[]
    for dy,dx in offs:
        ny, nx = ys+dy, xs+dx
        ok = (ny>=0)&(ny<h)&(nx>=0)&(nx<w)
        vals.append(X[:, np.clip(ny,0,h-1), np.clip(nx,0,w-1)]); valid.append(np.broadcast_to(ok, vals[-1].shape))
    V = np.stack(vals); M = np.stack(valid)
    cnt = M.sum(0); s = np.where(M, V, 0).sum(0)
    big = np.where(M, V, -10**9).max(0); small = np.where(M, V, 10**9).min(0)
    pr = s // np.maximum(cnt,1); act = np.where(cnt>0, big-small, 0)
    return pr, act
def hier(X, scale_ctx=True, actdiv=1):
    C,h,w = X.shape
    S = 0
    while (1<<S) < max(h,w): S += 1
    syms=[]; ctxs=[]
    ch = np.arange(C)[:,None]
    # coarsest: point (0,0) only
    syms.append(X[:,0:1,0:1].reshape(C,-1)); ctxs.append(np.broadcast_to(ch*100+99, (C,1)))
    for s in range(S, 0, -1):
        D = 1 << (s-1); d2 = 2*D
        cls = 0 if s == 1 else (1 if s == 2 else 2)
        if not scale_ctx: cls = 0
        for phase in ('diag','cross'):
            if phase == 'diag':
                yy, xx = np.meshgrid(np.arange(D, h, d2), np.arange(D, w, d2), indexing='ij')
                offs = [(-D,-D),(-D,D),(D,-D),(D,D)]
                ys, xs = yy.ravel(), xx.ravel()
            else:
                y1, x1 = np.meshgrid(np.arange(0, h, d2), np.arange(D, w, d2), indexing='ij')
                y2, x2 = np.meshgrid(np.arange(D, h, d2), np.arange(0, w, d2), indexing='ij')
                ys = np.concatenate([y1.ravel(), y2.ravel()]); xs = np.concatenate([x1.ravel(), x2.ravel()])
                offs = [(-D,0),(D,0),(0,-D),(0,D)]
            if len(ys)==0: continue
            pr, act = nb(X, ys, xs, offs)
            k = np.minimum(act//actdiv, K)
            syms.append(X[:, ys, xs]-pr); ctxs.append(ch*100 + (cls*2+(phase=='cross'))*12 + k if scale_ctx else ch*100+k)
    return np.concatenate([a.ravel() for a in syms]), np.concatenate([np.broadcast_to(b, a.shape).ravel() for a,b in zip(syms,ctxs)])
def H(fn, q, **kw):
    tr = [fn(np.round((l-MU[:,None,None])/q).astype(np.int64), **kw) for l in P[:44]]
    te = [fn(np.round((l-MU[:,None,None])/q).astype(np.int64), **kw) for l in P[44:]]
    s = np.concatenate([a for a,_ in tr]); k = np.concatenate([b for _,b in tr])
    st = np.concatenate([a for a,_ in te]); kt = np.concatenate([b for _,b in te])
    assert len(st) == sum(l.size for l in P[44:]), (len(st), sum(l.size for l in P[44:]))
    off = min(s.min(), st.min()); ns = max(s.max(), st.max())-off+1
    ku, inv = np.unique(np.concatenate([k,kt]), return_inverse=True)
    cnt = np.full((len(ku), ns), 0.5); np.add.at(cnt, (inv[:len(k)], s-off), 1)
    p = cnt/cnt.sum(1, keepdims=True)
    return -np.log2(p[inv[len(k):], st-off]).sum() / sum(l.shape[1]*l.shape[2]*64 for l in P[44:])
for q in (0.02, 0.05, 0.1, 0.2):
    print(q, 'causal %.4f' % H(causal, q), 'hier %.4f' % H(hier, q), 'hier-noscale %.4f' % H(hier, q, scale_ctx=False), 'hier-actdiv2 %.4f' % H(hier, q, actdiv=2), flush=True)
